"""What the server does after aggregation, and the state it keeps between rounds.

Two pure functions over tensors, run the same way by every executor:

- :func:`server_step`: FedAvgM and FedAdam (Reddi et al., "Adaptive Federated
  Optimization", ICLR 2021). The aggregate's change from the global model is a
  pseudo-gradient ``delta = x - aggregate``; momentum keeps ``m = beta m + delta``
  and steps ``x - lr m``; Adam keeps ``m = b1 m + (1 - b1) delta``,
  ``v = b2 v + (1 - b2) delta^2`` and steps ``x - lr m / (sqrt(v) + tau)``
  (no bias correction, as in the paper). A parameter no client trained this
  round (under modality-aware aggregation, a modality no sampled client held)
  has delta 0, and the momentum still carries it, as a FedAvgM server would.
- :class:`ControlVariates`: SCAFFOLD's server side (Karimireddy et al.,
  "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML
  2020): every admitted client sends its new control variate ``c_i+``; the
  server keeps it for the client's next round and moves its own by
  ``(1 / N) sum_i (c_i+ - c_i)`` over the round's clients.

Their state (the moments, the server's and every client's control variate)
lives beside the model in the federation's state under ``aux/`` keys, in
float64: it is saved with every checkpoint, travels as the pipeline's global
state artifact and is restored bitwise on resume.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedcmi.algorithms.aggregation import AUX, ClientUpdate, StateDict, UpdateRejected
from fedcmi.config import ServerConfig

#: Default server learning rates (Reddi et al.'s FedAvgM at 1 and FedAdam near 10^-2).
DEFAULT_LR = {"momentum": 1.0, "adam": 0.01}

MOMENT = AUX + "server/m/"
SECOND = AUX + "server/v/"
SERVER_CONTROL = AUX + "control/server/"


def client_control_prefix(cid: int) -> str:
    return f"{AUX}control/client/{cid}/"


def server_step(server: ServerConfig, optimizer: str, old: Mapping[str, torch.Tensor],
                aggregated: Mapping[str, torch.Tensor], aux: Mapping[str, torch.Tensor]
                ) -> tuple[StateDict, StateDict]:
    """The next global model and server state from the round's aggregate (``optimizer`` none: the aggregate)."""
    if optimizer == "none":
        return dict(aggregated), dict(aux)
    if optimizer not in DEFAULT_LR:
        raise ValueError(f"unknown server optimizer {optimizer!r}")
    lr = server.lr if server.lr is not None else DEFAULT_LR[optimizer]
    out: StateDict = {}
    state = dict(aux)
    for key, x in old.items():
        a = aggregated[key]
        if not x.is_floating_point():
            out[key] = a
            continue
        x64 = x.detach().cpu().double()
        delta = x64 - a.detach().cpu().double()
        m = state.get(MOMENT + key)
        m = torch.zeros_like(x64) if m is None else m.double()
        if optimizer == "momentum":
            m = server.momentum * m + delta
            step = m
        else:
            b1, b2 = server.betas
            v = state.get(SECOND + key)
            v = torch.zeros_like(x64) if v is None else v.double()
            m = b1 * m + (1 - b1) * delta
            v = b2 * v + (1 - b2) * delta.pow(2)
            state[SECOND + key] = v
            step = m / (v.sqrt() + server.tau)
        state[MOMENT + key] = m
        out[key] = (x64 - lr * step).to(x.dtype)
    return out, state


def client_control(aux: Mapping[str, torch.Tensor], cid: int, names: Iterable[str]
                   ) -> tuple[StateDict, StateDict]:
    """The server's control variate ``c`` and client ``cid``'s ``c_i`` (zero where none is kept yet)."""
    mine = client_control_prefix(cid)
    c: StateDict = {}
    ci: StateDict = {}
    for name in names:
        c[name] = aux.get(SERVER_CONTROL + name, torch.zeros(()))
        ci[name] = aux.get(mine + name, torch.zeros(()))
    return c, ci


class ControlVariates:
    """SCAFFOLD's server side for one round: checks each admitted client's new ``c_i``, keeps it, and sums
    the changes into the server's ``c``."""

    def __init__(self, shapes: Mapping[str, torch.Size], num_clients: int, aux: Mapping[str, torch.Tensor]) -> None:
        self.shapes = dict(shapes)
        self.num_clients = num_clients
        self.aux = aux
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: StateDict = {}

    def check(self, update: ClientUpdate) -> None:
        """Raise :class:`UpdateRejected` unless the update carries one finite control variate per parameter."""
        cid = update.client_id
        got, want = set(update.extra), set(self.shapes)
        if got != want:
            missing, extra = sorted(want - got), sorted(got - want)
            raise UpdateRejected(f"client {cid}: control variates do not fit the model (missing {missing[:3]}, "
                                 f"unexpected {extra[:3]}); algorithm.control_variates is on")
        for name, shape in self.shapes.items():
            t = update.extra[name]
            if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.shape != shape:
                raise UpdateRejected(f"client {cid}: control variate {name} is not a float tensor of shape "
                                     f"{tuple(shape)}")
            if not torch.isfinite(t).all():
                raise UpdateRejected(f"client {cid}: control variate {name} holds NaN or Inf")

    def add(self, update: ClientUpdate) -> None:
        prefix = client_control_prefix(update.client_id)
        for name in self.shapes:
            new = update.extra[name].detach().cpu().double()
            old = self.aux.get(prefix + name)
            change = new - (old.double() if old is not None else 0.0)
            self.sums[name] = self.sums[name] + change if name in self.sums else change
            self.kept[prefix + name] = new

    def result(self) -> StateDict:
        """The server state after the round: the clients' kept variates and the server's moved ``c``."""
        state = {k: v for k, v in self.aux.items()}
        state.update(self.kept)
        for name, total in self.sums.items():
            old = self.aux.get(SERVER_CONTROL + name)
            base = old.double() if old is not None else torch.zeros(self.shapes[name], dtype=torch.float64)
            state[SERVER_CONTROL + name] = base + total / self.num_clients
        return state
