"""The client sampler interface.

A sampler draws a round's clients from the round's own generator (seeded by the run's seed and the round
alone), so every executor (the engine, the Kubeflow steps, ``fedcmi sample``) draws the same clients
without the data. A sampler that looks at what the clients hold (:attr:`Sampler.reads_holdings`) gets the
partition's modalities, which every executor has on disk beside the data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from pydantic import BaseModel

if TYPE_CHECKING:
    from fedcmi.config import Config


#: the generator of :meth:`Sampler.inclusion`'s draws (fixed: the estimate is part of the accounting)
INCLUSION_SEED = 20240100403


class Sampler(ABC):
    """How a round's clients are drawn."""

    #: ``federation.sampler`` of this sampler.
    name: ClassVar[str] = ""
    #: Its settings (a pydantic model) at ``federation.<name>``; None when it has none.
    Options: ClassVar[type[BaseModel] | None] = None
    #: Whether :meth:`draw` needs each client's modalities (the partition file).
    reads_holdings: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @classmethod
    def check(cls, cfg: Config) -> None:
        """Raise ValueError (naming the fields) when ``cfg`` asks what this sampler cannot give."""
        return None

    @abstractmethod
    def draw(self, rng: np.random.Generator, num_clients: int, k: int,
             holdings: Sequence[tuple[str, ...]] | None) -> list[int]:
        """``k`` distinct clients of ``num_clients`` from ``rng``; ``holdings[c]``: client c's modalities
        (given when :attr:`reads_holdings`)."""

    def inclusion(self, num_clients: int, k: int, holdings: Sequence[tuple[str, ...]] | None,
                  draws: int = 4000) -> list[float]:
        """Each client's probability of being drawn in a round (what privacy accounting needs), here an
        upper estimate from ``draws`` seeded draws: the observed share plus four standard errors and one
        draw. A sampler that knows its rates exactly overrides it."""
        rng = np.random.default_rng(INCLUSION_SEED)
        counts = np.zeros(num_clients)
        for _ in range(draws):
            counts[self.draw(rng, num_clients, k, holdings)] += 1
        share = counts / draws
        return [float(min(1.0, p + 4 * np.sqrt(p * (1 - p) / draws) + 1 / draws)) for p in share]
