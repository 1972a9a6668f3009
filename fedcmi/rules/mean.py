"""FedAvg's rule (McMahan et al., AISTATS 2017): the sample-weighted mean, per modality group.

Weights are renormalised among the clients that have a say in a parameter. One running sum per
parameter: memory is flat in the number of clients.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel

from fedcmi.round.update import ClientUpdate, Scratch, StateDict
from fedcmi.rules.base import Owner, Rule


class Mean(Rule):
    """The sample-weighted mean."""

    name = "mean"

    def __init__(self, global_state: Mapping[str, torch.Tensor], owner: Owner | None = None,
                 options: BaseModel | None = None) -> None:
        super().__init__(global_state, owner, options)
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str | None, float] = {}
        self.scratch = Scratch()

    def add(self, update: ClientUpdate) -> None:
        w = float(update.num_examples)
        for key, value in self.said(update):
            if key in self.sums:  # widened into the scratch buffer, scaled, added: the same two roundings
                self.sums[key] += self.scratch.widen(value).mul_(w)
            else:
                self.sums[key] = value.to("cpu", torch.float64, copy=True).mul_(w)
        self.weights[None] = self.weights.get(None, 0.0) + w
        for m in set(update.modalities):
            self.weights[m] = self.weights.get(m, 0.0) + w
        self.count += 1

    def result(self) -> StateDict:
        out: StateDict = {}
        for key, g in self.global_state.items():
            if key in self.sums:
                out[key] = (self.sums[key] / self.weights[self.group(key)]).to(g.dtype)
            else:
                out[key] = self.keep(key)
        return out
