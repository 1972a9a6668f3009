"""What a client sends the server, and the federation state it is measured against.

A :class:`ClientUpdate` is the client's new model state (the full state dict), its sample count, the
modalities it holds, the figures it reports, and any client state the server keeps between rounds
(SCAFFOLD's control variate) under :attr:`ClientUpdate.extra`. The federation's state is the model's
tensors plus the server's own state under :data:`AUX` keys (its optimiser's moments, every client's
control variate): :func:`split_state` parts them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from fedcmi.errors import FedcmiError
from fedcmi.io import is_int

StateDict = dict[str, torch.Tensor]

#: Keys of the federation's state beyond the model: the server optimiser's moments and the clients' states.
AUX = "aux/"
#: Keys of an update's extra tensors when it travels as one tensor file.
EXTRA = "extra/"


class UpdateRejected(FedcmiError, ValueError):
    """A client update that cannot be aggregated; the message says why."""


class NonFiniteUpdate(UpdateRejected):
    """An update holding NaN or Inf: that client's local training diverged."""


class RunawayUpdate(UpdateRejected):
    """An update whose change is past the server's bound: a diverging client's, or a lying one's."""


class UpdateLate(UpdateRejected):
    """An update that missed its round: past the deadline, after the round had its clients, or never sent.
    Counted apart from the refused ones (:attr:`~fedcmi.round.record.Participation.late`)."""


class ClientFailed(FedcmiError, RuntimeError):
    """A client's training that failed where it ran (another process or pod); carries the reason."""


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
    #: L2 norm of the change from the round's global model, once admission has measured it
    change: float | None = field(default=None, compare=False)


#: A client's part of a round, produced lazily: an update, None (nothing to train), or an exception.
Producer = Callable[[], "ClientUpdate | None"]


def failure_reason(cid: int, exc: BaseException) -> str:
    """How a client's training failure reads in a round's ``rejected`` map, wherever it ran."""
    if isinstance(exc, ClientFailed):
        return str(exc)
    return f"client {cid}: training failed: {exc.__class__.__name__}: {exc}"


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


def check_update(global_state: Mapping[str, torch.Tensor], update: ClientUpdate, finite: bool = True) -> None:
    """Raise :class:`UpdateRejected` if ``update`` does not fit the global model: its keys, each tensor's
    dtype and shape, finite values (unless ``finite`` is false: the caller tells them from the change
    norm, see :func:`check_finite`) and a positive sample count."""
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
    if finite:
        check_finite(update)


def check_finite(update: ClientUpdate) -> None:
    """Raise :class:`NonFiniteUpdate` naming the first tensor of ``update`` that holds NaN or Inf.

    A pass of its own over the whole update; the round's admission runs it only when the update's float64
    change norm is not finite, which, the global model being finite, happens exactly when a value is NaN
    or Inf (float32 values squared and summed cannot overflow float64)."""
    for k, u in update.state.items():
        if u.is_floating_point() and not torch.isfinite(u).all():
            raise NonFiniteUpdate(f"client {update.client_id}: {k} holds NaN or Inf")


class Scratch:
    """One float64 buffer reused for each tensor of a pass over a model's state.

    Widening every tensor of every client's update to a fresh float64 copy costs an allocation per tensor
    (on the CPU, large ones come as fresh pages the kernel must zero); the server's passes (the change
    norm, the fold) take a view of this buffer instead. The view starts where the buffer starts, so each
    reduction over it runs exactly as over a fresh tensor of that shape: the figures are bitwise the same.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.buf = torch.empty(0, dtype=torch.float64, device=device)

    def like(self, t: torch.Tensor) -> torch.Tensor:
        """A float64 tensor of ``t``'s shape on the buffer's device; its values are undefined."""
        n = t.numel()
        if self.buf.numel() < n:
            self.buf = torch.empty(n, dtype=torch.float64, device=self.buf.device)
        return self.buf[:n].view(t.shape)

    def widen(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in float64 on the buffer's device, in the buffer (valid until the next call)."""
        return self.like(t).copy_(t)


def change_norm(global_state: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
                scratch: Scratch | None = None) -> float:
    """L2 norm of ``state - global_state`` over the floating tensors, in float64 (inf if it overflows)."""
    scratch = scratch or Scratch()
    total = 0.0
    for k, g in global_state.items():
        if g.is_floating_point() and k in state:
            d = scratch.widen(state[k]).sub_(g)  # float64 minus g widened elementwise: exact, as g.double()
            total += float(d.square_().sum())
    return math.sqrt(total) if math.isfinite(total) else float("inf")


def state_norm(state: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of a state's floating tensors, in float64."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in state.values() if v.is_floating_point()))
