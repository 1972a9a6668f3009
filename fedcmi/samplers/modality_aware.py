"""Modality-aware sampling: every round holds at least ``min_holders`` clients of each modality.

Under modality-blind sampling a round can draw no holder of a rarely held modality, and its encoder then
learns nothing that round (under modality-aware aggregation it is not even averaged); the FedCMI authors'
CMSFed (Fan et al., arXiv 2401.00403) argues that such selection biases multimodal FL. This sampler
draws the uniform sample first and then, modality by modality in a fixed order, swaps in holders of a
modality short of its quota for sampled clients that do not hold it (each pick uniform among those that
keep the quotas already met). A round that already meets every quota is the uniform one, client for
client; a modality held by fewer clients than the quota has all its holders drawn.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.config import Config
from fedcmi.partition import PartitionError
from fedcmi.samplers.base import Sampler


class ModalityAwareOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    min_holders: int = Field(1, ge=1, strict=True,
                             description="clients holding each modality in every round (at least)")


class ModalityAware(Sampler):
    """The uniform sample, with holders swapped in until each modality has its quota."""

    name = "modality_aware"
    Options = ModalityAwareOptions
    reads_holdings = True

    @classmethod
    def check(cls, cfg: Config) -> None:
        need = cfg.federation.options(ModalityAwareOptions).min_holders * len(cfg.data.modalities)
        if need > cfg.federation.clients_per_round:
            raise ValueError(
                f"federation.modality_aware.min_holders x {len(cfg.data.modalities)} modalities ({need}) exceeds "
                f"federation.clients_per_round ({cfg.federation.clients_per_round}): no round could hold them all")

    def draw(self, rng: np.random.Generator, num_clients: int, k: int,
             holdings: Sequence[tuple[str, ...]] | None) -> list[int]:
        if holdings is None or len(holdings) != num_clients:
            raise PartitionError(f"the modality-aware sampler needs the modalities of all {num_clients} clients; "
                                 f"the partition gives {0 if holdings is None else len(holdings)}: rerun "
                                 "`fedcmi partition`")
        sample = [int(c) for c in rng.choice(num_clients, size=k, replace=False)]
        quota = self.cfg.federation.options(ModalityAwareOptions).min_holders
        mods = self.cfg.data.modalities
        targets = {m: min(quota, sum(m in h for h in holdings)) for m in mods}
        met: list[str] = []
        for m in mods:
            while sum(m in holdings[c] for c in sample) < targets[m]:
                chosen = set(sample)
                incoming = [c for c in range(num_clients) if c not in chosen and m in holdings[c]]

                def keeps(c: int) -> bool:  # removing c leaves every quota already met intact
                    return all(sum(x in holdings[d] for d in sample if d != c) >= targets[x]
                               for x in met if x in holdings[c])

                outgoing = [c for c in sample if m not in holdings[c] and keeps(c)]
                # both lists are nonempty: the quota is short, so a holder is outside the sample; and
                # check() keeps the quotas within clients_per_round, so a removable client exists
                out = outgoing[int(rng.integers(len(outgoing)))]
                sample[sample.index(out)] = incoming[int(rng.integers(len(incoming)))]
            met.append(m)
        return sample
