"""Server aggregation as small pure functions over (parameters, num_examples).

Sums run in float64 in the order the updates come (callers sort by client
id), so the result is bitwise the same in one process or across pods.
:class:`Accumulator` folds updates one at a time, so a round's memory holds
one running sum, not every client's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

StateDict = dict[str, torch.Tensor]
Owner = Callable[[str], "str | None"]


class UpdateRejected(ValueError):
    """A client update that cannot be aggregated; the message says why."""


class NonFiniteUpdate(UpdateRejected):
    """An update holding NaN or Inf: that client's local training diverged."""


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    client_id: int
    state: StateDict
    num_examples: int
    modalities: tuple[str, ...]
    metrics: dict = field(default_factory=dict)


def check_update(global_state: Mapping[str, torch.Tensor], update: ClientUpdate) -> None:
    """Raise :class:`UpdateRejected` if ``update`` is not fit to aggregate."""
    if update.num_examples <= 0:
        raise UpdateRejected(f"client {update.client_id}: zero samples")
    missing = sorted(set(global_state) - set(update.state))
    extra = sorted(set(update.state) - set(global_state))
    if missing or extra:
        raise UpdateRejected(f"client {update.client_id}: keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, g in global_state.items():
        u = update.state[k]
        if u.shape != g.shape:
            raise UpdateRejected(
                f"client {update.client_id}: {k} has shape {tuple(u.shape)}, expected {tuple(g.shape)}")
        if u.is_floating_point() and not torch.isfinite(u).all():
            raise NonFiniteUpdate(f"client {update.client_id}: {k} holds NaN or Inf")


class Accumulator:
    """Running weighted sums for one round.

    With ``owner`` set (modality-aware FedAvg, as in FedCMI), a parameter owned
    by modality m is averaged over the clients holding m, weights renormalised
    among them, and left as it was when no client holds m; shared parameters
    average over every client. With ``owner=None`` every parameter is shared
    (plain FedAvg, McMahan et al. 2017).
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], owner: Owner | None = None) -> None:
        self.global_state = global_state
        self.owner = owner
        self.sums: dict[str, torch.Tensor] = {}
        self.weights: dict[str | None, float] = {}
        self.count = 0

    def _group(self, key: str) -> str | None:
        return self.owner(key) if self.owner else None

    def add(self, update: ClientUpdate) -> None:
        held = set(update.modalities)
        w = float(update.num_examples)
        for key, value in update.state.items():
            if not value.is_floating_point():
                continue
            group = self._group(key)
            if group is not None and group not in held:
                continue
            contrib = value.detach().to("cpu", torch.float64) * w
            if key in self.sums:
                self.sums[key] += contrib
            else:
                self.sums[key] = contrib
        self.weights[None] = self.weights.get(None, 0.0) + w
        for m in held:
            self.weights[m] = self.weights.get(m, 0.0) + w
        self.count += 1

    def result(self) -> StateDict:
        out: StateDict = {}
        for key, g in self.global_state.items():
            if key in self.sums:
                total = self.weights[self._group(key)]
                out[key] = (self.sums[key] / total).to(g.dtype)
            else:
                out[key] = g.detach().cpu().clone()
        return out


def fedavg(global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate]) -> StateDict:
    """Sample-weighted mean of every parameter."""
    acc = Accumulator(global_state)
    for u in updates:
        acc.add(u)
    return acc.result()


def modality_aware_fedavg(
    global_state: Mapping[str, torch.Tensor], updates: Sequence[ClientUpdate], owner: Owner
) -> StateDict:
    """FedCMI's aggregation: modality parameters averaged over the clients holding that modality."""
    acc = Accumulator(global_state, owner)
    for u in updates:
        acc.add(u)
    return acc.result()


def state_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """Largest absolute elementwise difference between two states."""
    worst = 0.0
    for k in a:
        if a[k].is_floating_point():
            worst = max(worst, float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0)
    return worst if math.isfinite(worst) else float("inf")
