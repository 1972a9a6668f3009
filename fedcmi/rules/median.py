"""The coordinate-wise median (Yin et al., "Byzantine-Robust Distributed Learning: Towards Optimal
Statistical Rates", ICML 2018), per modality group: robust to a minority of lying clients."""

from __future__ import annotations

import torch

from fedcmi.rules.base import CoordinateWise


class Median(CoordinateWise):
    """The middle value of each coordinate (the mean of the two middle ones for an even count)."""

    name = "median"

    def middle(self, ordered: torch.Tensor) -> torch.Tensor:
        n = len(ordered)
        return ordered[(n - 1) // 2:n // 2 + 1]
