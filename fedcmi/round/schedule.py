"""When things happen in a federation: which clients a round samples, how they split over workers, which
rounds end with an evaluation. Drawn from the settings and the round alone (and, for a sampler that looks
at what clients hold, the partition file), so every executor agrees without the data. Rounds are
numbered from 1."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcmi.config import Config
from fedcmi.partition import load_partition
from fedcmi.registry import SAMPLERS
from fedcmi.seeds import derive_seed

SAMPLING_STREAM = 0xC11E


def sample_clients(cfg: Config, round_no: int, holdings: Sequence[tuple[str, ...]] | None = None) -> list[int]:
    """The clients of round ``round_no`` (from 1), sorted, drawn by ``federation.sampler``: ``clients_per_round``
    and the over-selected extra (:attr:`Config.sampled_per_round`). ``holdings``
    (each client's modalities) is read from ``partition.file`` when the sampler needs it and none is given."""
    sampler = SAMPLERS.get(cfg.federation.sampler)(cfg)
    if sampler.reads_holdings and holdings is None:
        holdings = [c.modalities for c in load_partition(cfg.partition.file).clients]
    rng = np.random.default_rng(derive_seed(cfg.seed, round_no - 1, SAMPLING_STREAM))
    return sorted(sampler.draw(rng, cfg.partition.num_clients, cfg.sampled_per_round, holdings))


class Schedule:
    """Client sampling, the split of a round's clients over workers, and the evaluation schedule."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self._holdings: list[tuple[str, ...]] | None = None

    def _held(self) -> list[tuple[str, ...]] | None:
        """Each client's modalities, read once, when the sampler looks at them."""
        if self._holdings is None and SAMPLERS.get(self.cfg.federation.sampler).reads_holdings:
            self._holdings = [c.modalities for c in load_partition(self.cfg.partition.file).clients]
        return self._holdings

    @property
    def rounds(self) -> int:
        return self.cfg.federation.rounds

    def clients(self, round_no: int) -> list[int]:
        return sample_clients(self.cfg, round_no, self._held())

    def workers(self, per_worker: int) -> int:
        """How many workers (pods) a round needs when each trains up to ``per_worker`` clients."""
        return -(-self.cfg.sampled_per_round // per_worker)

    def clients_of_worker(self, round_no: int, worker: int, per_worker: int) -> list[int]:
        """The clients worker ``worker`` trains in round ``round_no``: consecutive runs of the sorted sample."""
        return self.clients(round_no)[worker * per_worker:(worker + 1) * per_worker]

    def is_last(self, round_no: int) -> bool:
        return round_no == self.rounds

    def evaluates(self, round_no: int) -> bool:
        """Whether round ``round_no`` ends with an evaluation: every ``evaluation.every`` and the last."""
        return round_no % self.cfg.evaluation.every == 0 or self.is_last(round_no)

    def probes(self, round_no: int) -> bool:
        """Whether round ``round_no``'s evaluation includes the linear probes (the run's final evaluation)."""
        return self.is_last(round_no) and self.cfg.evaluation.linear_probe
