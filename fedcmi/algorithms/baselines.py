"""Baselines on the plain fusion network: FedAvg, FedProx, single-modality FedAvg, OGM-GE."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from fedcmi.algorithms.aggregation import ClientUpdate
from fedcmi.algorithms.base import ClientContext, Strategy, local_sgd, snapshot
from fedcmi.algorithms.losses import ogm_coefficients


def _ce(model: nn.Module, x: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    loss = F.cross_entropy(model(x).mm_logits, y)
    return loss, {"ce": loss.item()}


class FedAvg(Strategy):
    """FedAvg (McMahan et al., AISTATS 2017) on the concat-fusion network."""

    name = "fedavg"
    mu = 0.0

    def train_client(self, model: nn.Module, ctx: ClientContext) -> ClientUpdate:
        metrics = local_sgd(model, ctx, _ce, mu=self.mu)
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)


class FedProx(FedAvg):
    """FedProx (Li et al., MLSys 2020): FedAvg plus (mu/2)||w - w_G||^2 locally."""

    name = "fedprox"

    @property
    def mu(self) -> float:  # type: ignore[override]
        return self.cfg.algorithm.mu


class Unimodal(FedAvg):
    """FedAvg on one modality alone (``algorithm.modality``); clients without it sit the round out."""

    name = "unimodal"

    @property
    def modality(self) -> str:
        assert self.cfg.algorithm.modality is not None
        return self.cfg.algorithm.modality

    def participates(self, modalities: Sequence[str]) -> bool:
        return self.modality in modalities

    def batch_modalities(self, modalities: Sequence[str]) -> tuple[str, ...]:
        return (self.modality,)


class OGMGE(FedAvg):
    """FedAvg with OGM-GE (Peng et al., "Balanced Multimodal Learning via On-the-fly
    Gradient Modulation", CVPR 2022).

    Per batch, each modality's confidence is the summed softmax probability of
    the true class under its uni-modal read-out; the leading modality's encoder
    gradients are scaled by 1 - tanh(alpha * ratio) and, with ``noise``, get
    Gaussian noise of the gradient's own spread (generalisation enhancement).
    """

    name = "ogm_ge"

    def train_client(self, model: nn.Module, ctx: ClientContext) -> ClientUpdate:
        cfg = self.cfg.algorithm.ogm
        mods = model.modalities  # type: ignore[attr-defined]
        gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
        coeffs: list[tuple[float, float]] = []

        def loss_fn(m: nn.Module, x: dict[str, torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
            out = m(x)
            loss = F.cross_entropy(out.mm_logits, y)
            terms = {"ce": loss.item()}
            if len(out.uni_logits) == 2:
                with torch.no_grad():
                    s = [float(out.uni_logits[k].softmax(1).gather(1, y[:, None]).sum()) for k in mods]
                c0, c1 = ogm_coefficients(s[0], s[1], cfg.alpha)
                coeffs.append((c0, c1))
                terms["coeff_" + mods[0]] = c0
                terms["coeff_" + mods[1]] = c1
            return loss, terms

        def modulate(m: nn.Module, terms: dict[str, float]) -> None:
            if not coeffs or "coeff_" + mods[0] not in terms:
                return
            c = dict(zip(mods, coeffs[-1]))
            for name, p in m.named_parameters():
                owner = m.owner(name)  # type: ignore[attr-defined]
                if owner is None or p.grad is None or c[owner] == 1.0:
                    continue
                p.grad.mul_(c[owner])
                if cfg.noise and p.grad.numel() > 1:
                    std = float(p.grad.std())
                    noise = torch.randn(p.grad.shape, generator=gen) * (std + 1e-8)
                    p.grad.add_(noise.to(p.grad.device))

        metrics = local_sgd(model, ctx, loss_fn, grad_hook=modulate)
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
