"""Norm clipping of each client's change (``server.clip_norm``), as in DP-FedAvg (McMahan et al., "Learning
Differentially Private Recurrent Language Models", ICLR 2018): an admitted update whose change from the
global model is longer than the bound is scaled down to it before it is combined."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedcmi.round.stage import ServerState, Stage
from fedcmi.round.update import ClientUpdate, change_norm


def clip_change(global_state: Mapping[str, torch.Tensor], update: ClientUpdate, max_norm: float,
                norm: float | None = None) -> ClientUpdate:
    """``update`` with its change from ``global_state`` scaled down to L2 norm ``max_norm`` (unchanged when
    already within it)."""
    norm = change_norm(global_state, update.state) if norm is None else norm
    if norm <= max_norm:
        return update
    scale = max_norm / norm
    state = {k: (g.double() + (update.state[k].double() - g.double()) * scale).to(g.dtype)
             if g.is_floating_point() else update.state[k] for k, g in global_state.items()}
    return ClientUpdate(update.client_id, state, update.num_examples, update.modalities, update.metrics, update.extra,
                        max_norm)


class Clipping(Stage):
    """Scales every admitted change down to ``max_norm``; counts the clients it clipped."""

    name = "clipping"

    def __init__(self, global_state: Mapping[str, torch.Tensor], max_norm: float) -> None:
        self.global_state = global_state
        self.max_norm = max_norm
        self.clipped: list[int] = []

    def admit(self, cid: int, update: ClientUpdate) -> ClientUpdate:
        norm = update.change if update.change is not None else change_norm(self.global_state, update.state)
        if norm > self.max_norm:
            self.clipped.append(cid)
            return clip_change(self.global_state, update, self.max_norm, norm)
        return update

    def conclude(self, state: ServerState) -> ServerState:
        return state
