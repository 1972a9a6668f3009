"""Server aggregation as small pure functions over (parameters, num_examples).

Sums run in float64 in the order the updates come (callers sort by client
id), so the result is bitwise the same in one process or across pods.
:class:`Accumulator` folds updates one at a time, so a round's memory holds
one running sum, not every client's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from fedcmi.io import is_int

StateDict = dict[str, torch.Tensor]
Owner = Callable[[str], "str | None"]


class UpdateRejected(ValueError):
    """A client update that cannot be aggregated; the message says why."""


class NonFiniteUpdate(UpdateRejected):
    """An update holding NaN or Inf: that client's local training diverged."""


class RunawayUpdate(UpdateRejected):
    """An update whose change is past the server's bound: a diverging client's, or a lying one's."""


@dataclass
class ClientUpdate:
    """What a client sends back after local training."""

    client_id: int
    state: StateDict
    num_examples: int
    modalities: tuple[str, ...]
    metrics: dict = field(default_factory=dict)
    #: What the client keeps between rounds and the server reads (SCAFFOLD's control variate), by parameter.
    extra: StateDict = field(default_factory=dict)


#: Keys of the federation's state beyond the model: the server optimiser's moments and the clients' states.
AUX = "aux/"
#: Keys of an update's extra tensors when it travels as one tensor file.
EXTRA = "extra/"


def split_state(state: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """The model's tensors and the federation's other state (keys under :data:`AUX`), apart. A torch
    state dict's keys never hold a ``/``, so the two never collide."""
    model = {k: v for k, v in state.items() if not k.startswith(AUX)}
    aux = {k: v for k, v in state.items() if k.startswith(AUX)}
    return model, aux


def model_state(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Only the model's tensors of a federation state (what is evaluated, served and registered)."""
    return split_state(state)[0]


def pack_update(update: ClientUpdate) -> StateDict:
    """An update's model tensors and extra tensors as one flat mapping (for one tensor file)."""
    return {**update.state, **{EXTRA + k: v for k, v in update.extra.items()}}


def unpack_tensors(tensors: Mapping[str, torch.Tensor]) -> tuple[StateDict, StateDict]:
    """:func:`pack_update` undone: (model tensors, extra tensors)."""
    state = {k: v for k, v in tensors.items() if not k.startswith(EXTRA)}
    extra = {k[len(EXTRA):]: v for k, v in tensors.items() if k.startswith(EXTRA)}
    return state, extra


def check_update(global_state: Mapping[str, torch.Tensor], update: ClientUpdate) -> None:
    """Raise :class:`UpdateRejected` if ``update`` does not fit the global model: its keys, each tensor's
    dtype and shape, finite values and a positive sample count."""
    n = update.num_examples
    if not is_int(n) or n <= 0:
        raise UpdateRejected(f"client {update.client_id}: num_examples must be a positive integer, got {n!r}")
    missing = sorted(set(global_state) - set(update.state))
    extra = sorted(set(update.state) - set(global_state))
    if missing or extra:
        raise UpdateRejected(f"client {update.client_id}: keys differ (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, g in global_state.items():
        u = update.state[k]
        if not isinstance(u, torch.Tensor) or u.dtype != g.dtype:
            raise UpdateRejected(f"client {update.client_id}: {k} has dtype {getattr(u, 'dtype', type(u).__name__)}, "
                                 f"expected {g.dtype}")
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

    def _contributions(self, update: ClientUpdate) -> Iterator[tuple[str, torch.Tensor]]:
        """The update's floating tensors it has a say in (shared ones, and those of modalities it holds),
        on the CPU in float64."""
        held = set(update.modalities)
        for key, value in update.state.items():
            if not value.is_floating_point():
                continue
            group = self._group(key)
            if group is not None and group not in held:
                continue
            yield key, value.detach().to("cpu", torch.float64)

    def add(self, update: ClientUpdate) -> None:
        held = set(update.modalities)
        w = float(update.num_examples)
        for key, value in self._contributions(update):
            contrib = value * w
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


class RobustAccumulator(Accumulator):
    """Coordinate-wise median or trimmed mean of the updates (Yin et al., "Byzantine-Robust Distributed
    Learning: Towards Optimal Statistical Rates", ICML 2018), per modality group as :class:`Accumulator`.

    Unweighted: a client's sample count cannot buy it more say, which is the point when counts may lie.
    Holds every update's floating tensors until :meth:`result` (memory grows with the clients of a round).
    """

    def __init__(self, global_state: Mapping[str, torch.Tensor], owner: Owner | None = None,
                 rule: str = "median", trim_fraction: float = 0.2) -> None:
        super().__init__(global_state, owner)
        if rule not in ("median", "trimmed_mean"):
            raise ValueError(f"unknown robust rule {rule!r}")
        self.rule = rule
        self.trim_fraction = trim_fraction
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, update: ClientUpdate) -> None:
        for key, value in self._contributions(update):
            self.values.setdefault(key, []).append(value)
        self.count += 1

    def result(self) -> StateDict:
        out: StateDict = {}
        for key, g in self.global_state.items():
            vals = self.values.get(key)
            if not vals:
                out[key] = g.detach().cpu().clone()
                continue
            ordered = torch.stack(vals).sort(dim=0).values
            n = len(vals)
            if self.rule == "median":
                mid = ordered[(n - 1) // 2:n // 2 + 1]  # one middle value, or the two around it
            else:
                k = min(int(self.trim_fraction * n), (n - 1) // 2)
                mid = ordered[k:n - k]
            out[key] = mid.mean(dim=0).to(g.dtype)
        return out


def change_norm(global_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of ``state - global_state`` over the floating tensors, in float64 (inf if it overflows)."""
    total = 0.0
    for k, g in global_state.items():
        if g.is_floating_point() and k in state:
            total += float((state[k].double() - g.double()).pow(2).sum())
    return math.sqrt(total) if math.isfinite(total) else float("inf")


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a state's floating tensors, in float64."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values() if v.is_floating_point()))


def clip_change(global_state: Mapping[str, torch.Tensor], update: ClientUpdate, max_norm: float,
                norm: float | None = None) -> ClientUpdate:
    """``update`` with its change from ``global_state`` scaled down to L2 norm ``max_norm`` (unchanged when
    already within it): norm clipping as in DP-FedAvg (McMahan et al., ICLR 2018)."""
    norm = change_norm(global_state, update.state) if norm is None else norm
    if norm <= max_norm:
        return update
    scale = max_norm / norm
    state = {k: (g.double() + (update.state[k].double() - g.double()) * scale).to(g.dtype)
             if g.is_floating_point() else update.state[k] for k, g in global_state.items()}
    return ClientUpdate(update.client_id, state, update.num_examples, update.modalities, update.metrics, update.extra)


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
