"""What a round admits: every client update checked against the round before it counts.

On the Kubeflow path an update arrives as a file from another pod; in the engine it comes from this
process. Both go through :class:`Admission`, so a lying or broken client is refused the same way on every
path, with a reason that names it, and never reaches the global model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from fedcmi.algorithms.aggregation import (
    ClientUpdate,
    RunawayUpdate,
    UpdateRejected,
    change_norm,
    check_update,
    clip_change,
    state_norm,
)
from fedcmi.algorithms.base import Strategy
from fedcmi.config import ServerConfig
from fedcmi.partition import Partition


@dataclass
class Admission:
    """The checks of one round: sampled clients, once each, within their shard, within the change bound."""

    rnd: int
    sampled: frozenset[int]
    partition: Partition
    strategy: Strategy
    server: ServerConfig
    global_state: Mapping[str, torch.Tensor]
    seen: set[int] = field(default_factory=set)
    clipped: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.bound = self.server.max_change_ratio * max(1.0, state_norm(self.global_state))

    def _once(self, cid: int) -> None:
        if cid not in self.sampled:
            raise UpdateRejected(f"client {cid} was not sampled in round {self.rnd + 1} "
                                 f"(sampled: {sorted(self.sampled)})")
        if cid in self.seen:
            raise UpdateRejected(f"client {cid} sent more than one update in round {self.rnd + 1}")
        self.seen.add(cid)

    def idle(self, cid: int) -> None:
        """A client that reports nothing to train: true only when the algorithm gives it nothing."""
        self._once(cid)
        mods = self.partition.client(cid).modalities
        if self.strategy.participates(mods):
            raise UpdateRejected(f"client {cid} reported nothing to train, but it holds {'+'.join(mods)}, "
                                 f"which {self.strategy.name} trains")

    def admit(self, cid: int, update: ClientUpdate) -> ClientUpdate:
        """``update`` as it may be combined (clipped when ``server.clip_norm`` says so), or
        :class:`UpdateRejected` with the reason."""
        self._once(cid)
        if update.client_id != cid:
            raise UpdateRejected(f"the update sent for client {cid} carries client id {update.client_id}")
        check_update(self.global_state, update)
        shard = self.partition.client(cid)
        if update.num_examples > shard.num_examples:
            raise UpdateRejected(f"client {cid} claims {update.num_examples} samples; its shard holds "
                                 f"{shard.num_examples}")
        if tuple(update.modalities) != shard.modalities:
            raise UpdateRejected(f"client {cid} claims modalities {list(update.modalities)}; the partition gives "
                                 f"it {list(shard.modalities)}")
        norm = change_norm(self.global_state, update.state)
        if not norm <= self.bound:
            raise RunawayUpdate(
                f"client {cid}: its change has L2 norm {norm:.4g}, above the bound {self.bound:.4g} "
                f"(server.max_change_ratio {self.server.max_change_ratio:g} x max(1, norm of the global model))")
        clip = self.server.clip_norm
        if clip is not None and norm > clip:
            self.clipped.append(cid)
            return clip_change(self.global_state, update, clip, norm)
        return update

