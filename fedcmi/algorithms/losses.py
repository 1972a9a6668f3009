"""FedCMI's loss terms as small pure functions over tensors.

Notation follows ``shared/fedcmi-method.md``: D the dominant modality, W the
weak one, T_c the class-wise temperature.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

_EPS = 1e-8


@dataclass(frozen=True)
class Dominance:
    """Which modality leads on this client, and by how much per class."""

    dominant: int  # index into the model's modalities
    rho: torch.Tensor  # (K,) P_D(c) / P_W(c); 1 for absent classes
    rho_bar: float  # mean of rho over present classes
    present: torch.Tensor  # (K,) bool


def true_class_probs(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class sums of softmax(logits)[y] and class counts."""
    p = logits.softmax(dim=1).gather(1, labels[:, None]).squeeze(1)
    sums = torch.zeros(num_classes, dtype=torch.float64, device=logits.device).index_add_(0, labels, p.double())
    counts = torch.bincount(labels, minlength=num_classes).to(torch.float64)
    return sums, counts


def directed_dominance(p_sums: tuple[torch.Tensor, torch.Tensor], counts: torch.Tensor, dominant: int) -> Dominance:
    """The ratios rho_c = P_D(c) / P_W(c) with modality ``dominant`` taken as D, whichever leads."""
    present = counts > 0
    if not present.any():
        raise ValueError("dominance needs at least one sample")
    safe = counts.clamp(min=1)
    p = [(p_sums[i] / safe).clamp(min=_EPS) for i in (0, 1)]
    rho = torch.where(present, p[dominant] / p[1 - dominant], torch.ones_like(p[0]))
    return Dominance(dominant, rho, float(rho[present].mean()), present)


def decide_dominance(p_sums: tuple[torch.Tensor, torch.Tensor], counts: torch.Tensor) -> Dominance:
    """rho_c = P_0(c) / P_1(c), rho_bar its mean over present classes; the larger side dominates.

    ``p_sums`` holds, per modality, the per-class sums of the true-class
    probability; ``counts`` the per-class sample counts.
    """
    first = directed_dominance(p_sums, counts, 0)
    return first if first.rho_bar > 1.0 else directed_dominance(p_sums, counts, 1)


def class_temperatures(dom: Dominance, beta: float, min_temperature: float) -> torch.Tensor:
    """T_c = 1 / (1 + beta * ln(rho_c / rho_bar)) where rho_c > rho_bar, else 1; clamped below."""
    ratio = dom.rho / dom.rho_bar
    above = dom.present & (ratio > 1.0)
    t = torch.ones_like(dom.rho)
    t[above] = 1.0 / (1.0 + beta * torch.log(ratio[above]))
    return t.clamp(min=min_temperature, max=1.0)


def infiltration_loss(
    teacher_logits: torch.Tensor, student_logits: torch.Tensor, temps: torch.Tensor, t_squared: bool = False
) -> torch.Tensor:
    """mean_i [ -sum_k softmax(t_i / T_i)[k] * log_softmax(s_i / T_i)[k] ], teacher detached.

    ``temps`` is one temperature per sample (T of the sample's label).
    """
    tt = temps.to(student_logits.dtype)[:, None]
    p_t = (teacher_logits.detach() / tt).softmax(dim=1)
    log_p_s = F.log_softmax(student_logits / tt, dim=1)
    per_sample = -(p_t * log_p_s).sum(dim=1)
    if t_squared:
        per_sample = per_sample * temps.to(per_sample.dtype) ** 2
    return per_sample.mean()


def proximal_term(params: Iterable[tuple[str, torch.Tensor]], anchor: dict[str, torch.Tensor],
                  mu: float) -> torch.Tensor:
    """(mu / 2) * ||w - w_G||^2 over the named trainable parameters."""
    total = None
    for name, p in params:
        d = (p - anchor[name]).pow(2).sum()
        total = d if total is None else total + d
    if total is None:
        return torch.zeros(())
    return 0.5 * mu * total


def ogm_coefficients(score_0: float, score_1: float, alpha: float) -> tuple[float, float]:
    """OGM-GE (Peng et al., CVPR 2022): slow the leading modality's encoder by 1 - tanh(alpha * ratio)."""
    if score_0 <= 0 or score_1 <= 0:
        return 1.0, 1.0
    ratio_1 = score_1 / score_0
    if ratio_1 > 1:
        return 1.0, 1.0 - math.tanh(alpha * ratio_1)
    return 1.0 - math.tanh(alpha * (1.0 / ratio_1)), 1.0
