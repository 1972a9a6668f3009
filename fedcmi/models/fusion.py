"""Fusion heads F(a, b): two d-vectors (slot 0, slot 1) to class logits."""

from __future__ import annotations

import torch
from torch import nn


class ConcatFusion(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * dim, num_classes)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([a, b], dim=1))


class SumFusion(nn.Module):
    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fc(a + b)


class FiLMFusion(nn.Module):
    """Slot 0 modulates slot 1: fc(gamma(a) * b + beta(a)) (Perez et al., 2018)."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.film = nn.Linear(dim, 2 * dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(a).chunk(2, dim=1)
        return self.fc(gamma * b + beta)


class GatedFusion(nn.Module):
    """A learned per-feature gate between the two slots."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.gate = nn.Linear(2 * dim, dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.gate(torch.cat([a, b], dim=1)))
        return self.fc(g * a + (1 - g) * b)


FUSIONS = {"concat": ConcatFusion, "sum": SumFusion, "film": FiLMFusion, "gated": GatedFusion}


def build_fusion(kind: str, dim: int, num_classes: int) -> nn.Module:
    return FUSIONS[kind](dim, num_classes)
