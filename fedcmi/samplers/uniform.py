"""Uniform sampling without replacement (FedAvg's, McMahan et al. 2017): blind to what clients hold."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedcmi.samplers.base import Sampler


class Uniform(Sampler):
    """Every set of ``clients_per_round`` clients equally likely."""

    name = "uniform"

    def draw(self, rng: np.random.Generator, num_clients: int, k: int,
             holdings: Sequence[tuple[str, ...]] | None) -> list[int]:
        return [int(c) for c in rng.choice(num_clients, size=k, replace=False)]

    def inclusion(self, num_clients: int, k: int, holdings: Sequence[tuple[str, ...]] | None,
                  draws: int = 0) -> list[float]:
        return [k / num_clients] * num_clients
