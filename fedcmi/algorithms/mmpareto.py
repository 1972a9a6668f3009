"""MMPareto (Wei and Hu, "MMPareto: Boosting Multimodal Learning with Innocent Unimodal Assistance",
ICML 2024), adapted to federated learning.

Chosen over AGM (ICCV 2023) and MLA (CVPR 2024) for three reasons: it needs only the multimodal and
uni-modal losses that the plain fusion network already gives (AGM needs extra forward passes per
modality to estimate its mono-modal responses, MLA replaces joint training by alternating uni-modal
steps with a head of its own); it has no setting to tune, so the fair protocol's learning-rate grid is
all it is given, as the baselines are; and it acts only on each client's gradients, so it composes with
the server side unchanged (modality-aware or plain aggregation, server optimisers, SCAFFOLD).

On a multimodal client each batch has the multimodal loss L_mm and a uni-modal loss L_m per modality (the
fusion head read with the other slot zero). For modality m's encoder, g_mm = grad L_mm and g_m = grad L_m
(over the whole encoder): when they agree (cosine >= 0) the direction is their mean; when they conflict it
is the minimum-norm point of the segment between them (the two-task MGDA solution, a Pareto-stationary
direction that harms neither loss). Its length is then set to ||g_mm|| + ||g_m||, keeping the step size
the plain sum g_mm + g_m would have had (the paper's point: the uni-modal loss should help without its
direction hurting and without shrinking the step). The shared fusion head takes grad(L_mm + sum_m L_m).
Single-modality clients train FedAvg's loss.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from fedcmi.algorithms.base import ClientContext, Strategy, cross_entropy, local_sgd, snapshot
from fedcmi.config import Config
from fedcmi.models.networks import MultimodalNet
from fedcmi.round.update import ClientUpdate


def min_norm_weight(g1: torch.Tensor, g2: torch.Tensor) -> float:
    """The w in [0, 1] minimising ||w g1 + (1 - w) g2|| (closed form for two vectors)."""
    diff = g1 - g2
    denom = float(diff.pow(2).sum())
    if denom == 0.0:
        return 0.5
    return min(max(float((g2 * (g2 - g1)).sum()) / denom, 0.0), 1.0)


def pareto_combine(g_mm: torch.Tensor, g_uni: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """MMPareto's gradient for one encoder from its multimodal and uni-modal gradients (flat vectors);
    also whether the two conflicted."""
    n1, n2 = float(g_mm.norm()), float(g_uni.norm())
    if n1 == 0.0 or n2 == 0.0:
        return g_mm + g_uni, False
    conflict = float((g_mm * g_uni).sum()) < 0.0
    w = min_norm_weight(g_mm, g_uni) if conflict else 0.5
    d = w * g_mm + (1.0 - w) * g_uni
    norm = float(d.norm())
    if norm == 0.0:
        return torch.zeros_like(d), conflict
    return d * ((n1 + n2) / norm), conflict


class MMPareto(Strategy):
    """The plain fusion network with multimodal and uni-modal losses, each encoder's gradients combined
    without conflict."""

    name = "mmpareto"

    @classmethod
    def per_sample_obstacle(cls, cfg: Config) -> str | None:
        return ("MMPareto replaces the encoders' gradients by a combination of the batch's multimodal and "
                "unimodal gradients weighed by their directions over the whole batch, not per example, so a "
                "clipped example's gradient is not what the step uses; use a method whose loss is per example "
                "(fedavg, fedprox, scaffold, ume, umt)")

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        if len(ctx.modalities) < 2:
            metrics = local_sgd(model, ctx, cross_entropy)
            return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
        mods = model.modalities
        encoder = {m: [p for name, p in model.named_parameters() if model.owner(name) == m and p.requires_grad]
                   for m in mods}
        pending: dict[str, list[torch.Tensor]] = {}

        def loss_fn(m: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, float]]:
            out = m(x)
            l_mm = F.cross_entropy(out.mm_logits, y)
            terms = {"ce": l_mm.item()}
            total = l_mm
            for k in mods:
                l_k = F.cross_entropy(out.uni_logits[k], y)
                g_mm = torch.autograd.grad(l_mm, encoder[k], retain_graph=True, allow_unused=True)
                g_k = torch.autograd.grad(l_k, encoder[k], retain_graph=True, allow_unused=True)
                flat_mm = _flat(g_mm, encoder[k])
                combined, conflict = pareto_combine(flat_mm, _flat(g_k, encoder[k]))
                pending[k] = _split(combined, encoder[k])
                terms[f"uni_{k}"] = l_k.item()
                terms[f"conflict_{k}"] = float(conflict)
                total = total + l_k
            return total, terms

        def replace(m: MultimodalNet, terms: dict[str, float]) -> None:
            for k, grads in pending.items():
                for p, g in zip(encoder[k], grads, strict=True):
                    p.grad = g.to(p.dtype)
            pending.clear()

        metrics = local_sgd(model, ctx, loss_fn, grad_hook=replace)
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)


def _flat(grads: tuple[torch.Tensor | None, ...], params: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).float()
                      for g, p in zip(grads, params, strict=True)])


def _split(flat: torch.Tensor, params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        out.append(flat[start:start + p.numel()].view_as(p))
        start += p.numel()
    return out
