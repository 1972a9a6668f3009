"""Client state the server keeps between rounds: SCAFFOLD's control variates (Karimireddy et al.,
"SCAFFOLD: Stochastic Controlled Averaging for Federated Learning", ICML 2020).

Every admitted client sends its new control variate ``c_i+`` under the update's ``extra`` tensors; the
server keeps it for the client's next round and moves its own ``c`` by ``(1 / N) sum_i (c_i+ - c_i)`` over
the round's clients. The variates live beside the model in the federation's state under ``aux/control/``
keys, in float64, so checkpoints, resume and the pipeline's global-state artifact carry them.

A client's variate is bounded like its weights: SCAFFOLD's own rule gives
``||c_i+ - c_i + c|| = ||x - y_i|| / (K lr)`` for the parameters it trained (and ``||c||`` for the others),
with K >= 1 local steps, so a variate further from that than its own measured change allows is refused
(:meth:`ControlVariates.admit`). A finite 1e30 can no longer move the server's ``c``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from fedcmi.round.stage import ServerState, Stage
from fedcmi.round.update import AUX, ClientUpdate, StateDict, UpdateRejected

SERVER_CONTROL = AUX + "control/server/"


def client_control_prefix(cid: int) -> str:
    return f"{AUX}control/client/{cid}/"


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


class ControlVariates(Stage):
    """Checks each admitted client's new ``c_i``, keeps it, and sums the changes into the server's ``c``."""

    name = "control_variates"

    #: slack on SCAFFOLD's identity: float32 training, momentum's effective step, rounding
    SLACK = 2.0

    def __init__(self, shapes: Mapping[str, torch.Size], num_clients: int, aux: Mapping[str, torch.Tensor],
                 lr: float) -> None:
        self.shapes = dict(shapes)
        self.num_clients = num_clients
        self.aux = aux
        self.lr = lr  # the round's client learning rate: K lr_eff >= lr
        self.sums: dict[str, torch.Tensor] = {}
        self.kept: StateDict = {}

    def admit(self, cid: int, update: ClientUpdate) -> ClientUpdate:
        """Refuse an update unless it carries one finite control variate per parameter."""
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
        self._bounded(cid, update)
        return update

    def _bounded(self, cid: int, update: ClientUpdate) -> None:
        c, ci = client_control(self.aux, cid, self.shapes)
        moved = torch.zeros((), dtype=torch.float64)
        server = torch.zeros((), dtype=torch.float64)
        for name in self.shapes:
            new = update.extra[name].detach().cpu().double()
            moved += (new - ci[name].double() + c[name].double()).pow(2).sum()
            server += c[name].double().pow(2).sum()
        change = update.change if update.change is not None else 0.0
        bound = self.SLACK * (change / self.lr + float(server.sqrt())) + 1e-6
        if not float(moved.sqrt()) <= bound:
            raise UpdateRejected(
                f"client {cid}: its control variates moved by {float(moved.sqrt()):.4g}, more than its own change "
                f"allows ({bound:.4g} = {self.SLACK:g} x (change {change:.4g} / lr {self.lr:g} + norm of the "
                "server's variate)); SCAFFOLD state is bounded like the weights")

    def accept(self, update: ClientUpdate) -> None:
        prefix = client_control_prefix(update.client_id)
        for name in self.shapes:
            new = update.extra[name].detach().cpu().double()
            old = self.aux.get(prefix + name)
            change = new - (old.double() if old is not None else 0.0)
            self.sums[name] = self.sums[name] + change if name in self.sums else change
            self.kept[prefix + name] = new

    def conclude(self, state: ServerState) -> ServerState:
        """The server state after the round: the clients' kept variates and the server's moved ``c``."""
        aux = dict(state.aux)
        aux.update(self.kept)
        for name, total in self.sums.items():
            old = self.aux.get(SERVER_CONTROL + name)
            base = old.double() if old is not None else torch.zeros(self.shapes[name], dtype=torch.float64)
            aux[SERVER_CONTROL + name] = base + total / self.num_clients
        state.aux = aux
        return state
