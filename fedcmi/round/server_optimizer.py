"""The server's step after aggregation: FedAvgM and FedAdam (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021).

The aggregate's change from the global model is a pseudo-gradient ``delta = x - aggregate``; momentum
keeps ``m = beta m + delta`` and steps ``x - lr m``; Adam keeps ``m = b1 m + (1 - b1) delta``,
``v = b2 v + (1 - b2) delta^2`` and steps ``x - lr m / (sqrt(v) + tau)`` (no bias correction, as in the
paper). A parameter no client trained this round (under modality-aware aggregation, a modality no sampled
client held) has delta 0, and the momentum still carries it, as a FedAvgM server would. The moments live
beside the model under ``aux/server/`` keys, in float64.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedcmi.config import ServerConfig
from fedcmi.round.stage import ServerState, Stage
from fedcmi.round.update import AUX, StateDict

#: Default server learning rates (Reddi et al.'s FedAvgM at 1 and FedAdam near 10^-2).
DEFAULT_LR = {"momentum": 1.0, "adam": 0.01}

MOMENT = AUX + "server/m/"
SECOND = AUX + "server/v/"


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


class ServerOptimizer(Stage):
    """Steps from the round's global model along the aggregate's change (``server.optimizer``)."""

    name = "server_optimizer"

    def __init__(self, server: ServerConfig, optimizer: str) -> None:
        self.server = server
        self.optimizer = optimizer

    def conclude(self, state: ServerState) -> ServerState:
        state.weights, state.aux = server_step(self.server, self.optimizer, state.previous, state.weights, state.aux)
        return state
