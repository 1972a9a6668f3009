"""PMR, prototypical modal rebalance (Fan, Xu, Wang, Zhu, Guo, "PMR: Prototypical Modal Rebalance for
Multimodal Learning", CVPR 2023), adapted to federated learning.

Per modality m, the class prototypes p_m^k are the mean encoder features of class k. A sample's
prototypical logits are -||h_m - p_m^k||^2 and its prototypical cross-entropy PCE_m the cross-entropy of
those. Per batch the modalities' prototype scores s_m (summed softmax probability of the true class)
give the imbalance ratio rho = s_D / s_W of the leading modality D over the weak one W, and the loss is

    CE(F(h_a, h_b), y) + alpha * max(rho - 1, 0) * PCE_W - entropy_weight * H(softmax(-dist_D))

so the weak modality is pulled toward its prototypes in proportion to how far it lags, and, during the
first ``entropy_epochs`` local epochs of the federation, the leading modality's prototype distribution is
kept from sharpening (prototype entropy regularisation). Federated: each multimodal client computes the
prototypes once a round from the received model over its own data (the paper does so once an epoch);
classes absent on the client are left out of the prototypical softmax. Single-modality clients train
FedAvg's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.algorithms.base import ClientContext, Strategy, cross_entropy, local_sgd, snapshot
from fedcmi.config import Config, Float, Int
from fedcmi.models.networks import MultimodalNet
from fedcmi.round.update import ClientUpdate


class PMROptions(BaseModel):
    """PMR's settings (``algorithm.pmr``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    alpha: Float = Field(1.0, ge=0, description="strength of the weak modality's prototypical cross-entropy")
    entropy_weight: Float = Field(0.1, ge=0, description="weight of the leading modality's prototype entropy")
    entropy_epochs: Int = Field(10, ge=0, le=1_000_000, description="local epochs of the federation (rounds x "
                                "local_epochs) during which the entropy term acts")


@torch.no_grad()
def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, d) mean feature per class and a (K,) mask of the classes present."""
    sums = torch.zeros(num_classes, features.shape[1], dtype=torch.float64, device=features.device)
    sums.index_add_(0, labels, features.double())
    counts = torch.bincount(labels, minlength=num_classes).to(sums.device)
    present = counts > 0
    protos = sums / counts.clamp(min=1)[:, None].double()
    return protos.to(features.dtype), present


def prototype_logits(features: torch.Tensor, protos: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """-||h - p_k||^2 per class; absent classes at -inf (left out of the softmax)."""
    d = (features[:, None, :] - protos.to(features.dtype)[None, :, :]).pow(2).sum(dim=2)  # no sqrt: finite at 0
    return (-d).masked_fill(~present[None, :], float("-inf"))


def prototype_score(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Summed softmax probability of the true class under the prototypical logits."""
    return float(logits.detach().softmax(dim=1).gather(1, labels[:, None]).sum())


def rebalance_weights(score_a: float, score_b: float, alpha: float) -> tuple[int, float]:
    """(index of the leading modality, the weak one's PCE weight alpha * (rho - 1)) with rho = s_D / s_W."""
    lead = 0 if score_a >= score_b else 1
    s_d, s_w = (score_a, score_b) if lead == 0 else (score_b, score_a)
    rho = s_d / max(s_w, 1e-8)
    return lead, alpha * max(rho - 1.0, 0.0)


def prototype_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean entropy of the prototypical softmax (absent classes contribute nothing)."""
    p = logits.softmax(dim=1)
    logp = torch.where(p > 0, logits.log_softmax(dim=1), torch.zeros_like(p))
    return -(p * logp).sum(dim=1).mean()


class PMR(Strategy):
    """FedAvg's network, each multimodal client rebalanced by its modalities' prototypes."""

    name = "pmr"
    Options = PMROptions

    @classmethod
    def per_sample_obstacle(cls, cfg: Config) -> str | None:
        return ("PMR's prototypes are means over all of the client's examples, and its rebalancing weight comes "
                "from the whole batch's prototype scores, so one example moves every other example's loss; use a "
                "method whose loss is per example (fedavg, fedprox, scaffold, ume, umt)")

    @torch.no_grad()
    def prototypes(self, model: MultimodalNet, ctx: ClientContext, num_classes: int
                   ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per modality, the class prototypes of the received model over the client's data."""
        was = model.training
        model.eval()
        feats: dict[str, list[torch.Tensor]] = {m: [] for m in model.modalities}
        labels = []
        for x, y in ctx.device_batches(0):
            h = model.encode(x)
            for m in model.modalities:
                feats[m].append(h[m])
            labels.append(y)
        model.train(was)
        y_all = torch.cat(labels)
        return {m: class_prototypes(torch.cat(feats[m]), y_all, num_classes) for m in model.modalities}

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        if len(ctx.modalities) < 2:
            metrics = local_sgd(model, ctx, cross_entropy)
            return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
        opts = self.options(PMROptions)
        mods = model.modalities
        protos = self.prototypes(model, ctx, model.num_classes)
        entropy_on = opts.entropy_weight > 0 and ctx.rounds_done * ctx.cfg.federation.local_epochs < opts.entropy_epochs

        def loss_fn(m: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, float]]:
            out = m(x)
            ce = F.cross_entropy(out.mm_logits, y)
            logits = [prototype_logits(out.h[k], *protos[k]) for k in mods]
            lead, weight = rebalance_weights(prototype_score(logits[0], y), prototype_score(logits[1], y),
                                             opts.alpha)
            loss = ce
            terms = {"ce": ce.item(), "pce_weight": weight, f"lead_{mods[0]}": float(lead == 0)}
            if weight > 0:
                pce = F.cross_entropy(logits[1 - lead], y)
                loss = loss + weight * pce
                terms["pce"] = pce.item()
            if entropy_on:
                ent = prototype_entropy(logits[lead])
                loss = loss - opts.entropy_weight * ent
                terms["entropy"] = ent.item()
            return loss, terms

        metrics = local_sgd(model, ctx, loss_fn)
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
