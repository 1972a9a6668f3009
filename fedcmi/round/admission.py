"""What a round admits: every client update checked against the round before it counts.

On the Kubeflow path an update arrives as a file from another pod; in the engine it comes from this
process. Both go through :class:`Admission`, so a lying or broken client is refused the same way on every
path, with a reason that names it, and never reaches the global model.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from fedcmi.partition import Partition
from fedcmi.round.stage import Stage
from fedcmi.round.update import (
    ClientUpdate,
    RunawayUpdate,
    Scratch,
    UpdateRejected,
    change_norm,
    check_finite,
    check_update,
    state_norm,
)


class Admission(Stage):
    """The checks of one round: sampled clients, once each, within their shard, within the change bound
    (``max_change_ratio`` times max(1, the global model's norm))."""

    name = "admission"

    def __init__(self, round_no: int, sampled: Sequence[int], partition: Partition,
                 trains: Callable[[Sequence[str]], bool], algorithm: str, max_change_ratio: float,
                 global_state: Mapping[str, torch.Tensor]) -> None:
        self.round_no = round_no
        self.sampled = frozenset(sampled)
        self.partition = partition
        self.trains = trains
        self.algorithm = algorithm
        self.ratio = max_change_ratio
        self.global_state = global_state
        self.seen: set[int] = set()
        self.bound = max_change_ratio * max(1.0, state_norm(global_state))
        self.scratch = Scratch()  # the change norm's float64 buffer, for every update of the round

    def _once(self, cid: int) -> None:
        if cid not in self.sampled:
            raise UpdateRejected(f"client {cid} was not sampled in round {self.round_no} "
                                 f"(sampled: {sorted(self.sampled)})")
        if cid in self.seen:
            raise UpdateRejected(f"client {cid} sent more than one update in round {self.round_no}")
        self.seen.add(cid)

    def idle(self, cid: int) -> None:
        """A client that reports nothing to train: true only when the algorithm gives it nothing."""
        self._once(cid)
        mods = self.partition.client(cid).modalities
        if self.trains(mods):
            raise UpdateRejected(f"client {cid} reported nothing to train, but it holds {'+'.join(mods)}, "
                                 f"which {self.algorithm} trains")

    def admit(self, cid: int, update: ClientUpdate) -> ClientUpdate:
        """``update``, sent for client ``cid``, checked (its change measured into ``update.change``)."""
        self._once(cid)
        if update.client_id != cid:
            raise UpdateRejected(f"the update sent for client {cid} carries client id {update.client_id}")
        check_update(self.global_state, update, finite=False)
        norm = change_norm(self.global_state, update.state, self.scratch)  # one pass: the bound and finiteness
        if not math.isfinite(norm):
            check_finite(update)  # a NaN or Inf: named, before any other claim is judged
        shard = self.partition.client(cid)
        if update.num_examples > shard.num_examples:
            raise UpdateRejected(f"client {cid} claims {update.num_examples} samples; its shard holds "
                                 f"{shard.num_examples}")
        if tuple(update.modalities) != shard.modalities:
            raise UpdateRejected(f"client {cid} claims modalities {list(update.modalities)}; the partition gives "
                                 f"it {list(shard.modalities)}")
        if not norm <= self.bound:
            raise RunawayUpdate(
                f"client {cid}: its change has L2 norm {norm:.4g}, above the bound {self.bound:.4g} "
                f"(server.max_change_ratio {self.ratio:g} x max(1, norm of the global model))")
        update.change = norm
        return update
