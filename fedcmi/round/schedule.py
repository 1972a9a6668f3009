"""When things happen in a federation: which clients a round samples, how they split over workers, which
rounds end with an evaluation. Drawn from the settings and the round alone, so every executor agrees
without the data. Rounds are numbered from 1."""

from __future__ import annotations

import numpy as np

from fedcmi.config import Config
from fedcmi.seeds import derive_seed

SAMPLING_STREAM = 0xC11E


def sample_clients(cfg: Config, round_no: int) -> list[int]:
    """The clients of round ``round_no`` (from 1), sorted."""
    rng = np.random.default_rng(derive_seed(cfg.seed, round_no - 1, SAMPLING_STREAM))
    n = cfg.partition.num_clients
    return sorted(rng.choice(n, size=cfg.federation.clients_per_round, replace=False).tolist())


class Schedule:
    """Client sampling, the split of a round's clients over workers, and the evaluation schedule."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    def rounds(self) -> int:
        return self.cfg.federation.rounds

    def clients(self, round_no: int) -> list[int]:
        return sample_clients(self.cfg, round_no)

    def workers(self, per_worker: int) -> int:
        """How many workers (pods) a round needs when each trains up to ``per_worker`` clients."""
        return -(-self.cfg.federation.clients_per_round // per_worker)

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
