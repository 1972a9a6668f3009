"""FedCMI: Fan, Xu, Wang, Zhu, Guo, "Balanced Multi-modal Federated Learning via
Cross-Modal Infiltration", arXiv 2401.00894 (2023).

On a multimodal client the loss is

    CE(F(z_mm, z_nn), y) + w_uni [CE(C_m(z_mm), y) + CE(C_n(z_nn), y)]
      + lambda_inf * L_inf + (mu / 2) ||w - w_G||^2

where L_inf distils the *global* model's dominant self-branch into the *local*
weak modality's infiltration branch, with class-wise temperatures. Which
modality dominates is measured: ``dominance: batch`` (the reference code)
decides per batch on the current local model and takes the class
temperatures once per round from the received model; ``round`` decides both
once per round on the received model over the client's data. No
distillation during the warm-up (``warmup_epochs`` local epochs).
A client holding only m trains CE(F(z_mm, z_mn), y) (+ the proximal term).
The server aggregates modality-aware. Every ablation in the method file is a
switch in :class:`FedCMIOptions` (``algorithm.fedcmi``) or ``model.projectors``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.algorithms.base import ClientContext, Strategy, local_sgd, snapshot
from fedcmi.algorithms.losses import (
    Dominance,
    class_temperatures,
    decide_dominance,
    directed_dominance,
    infiltration_loss,
    true_class_probs,
)
from fedcmi.config import Config, Float, Int
from fedcmi.models.networks import FedCMINet, MultimodalNet
from fedcmi.round.update import ClientUpdate

if TYPE_CHECKING:
    from fedcmi.data.base import DatasetSpec


class FedCMIOptions(BaseModel):
    """FedCMI's switches (``algorithm.fedcmi``); each ablation in the method file is one of these."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    w_uni: Float = Field(2.0, ge=0, description="weight of the two uni-modal cross-entropies")
    lambda_inf: Float = Field(1.0, ge=0, description="weight of the infiltration (distillation) loss")
    infiltration: bool = True
    warmup_rounds: Int = Field(1, ge=0, description="rounds without distillation, when warmup_epochs is null")
    warmup_epochs: Int | None = Field(
        10, ge=0, le=1_000_000, description="no distillation until the federation has run this many local epochs "
        "(rounds x federation.local_epochs), as the reference code counts its warm-up; null: warmup_rounds")
    dominance: Literal["round", "batch"] = Field(
        "batch", description="batch: the distillation direction per batch on the local model, the class "
        "temperatures once per round on the received model (the reference code); round: both once per round")
    class_temperature: bool = True
    beta: Float = Field(2.0, ge=0)
    temperature: Float = Field(1.0, gt=0)
    min_temperature: Float = Field(0.05, gt=0, le=1)
    t_squared: bool = False

    def first_distillation_round(self, local_epochs: int) -> int:
        """The first (0-based) round that distils, after the warm-up."""
        if self.warmup_epochs is None:
            return self.warmup_rounds
        return -(-self.warmup_epochs // local_epochs)


class FedCMI(Strategy):
    name = "fedcmi"
    Options = FedCMIOptions
    reads = ("mu",)
    aggregation = "modality_aware"

    @classmethod
    def per_sample_obstacle(cls, cfg: Config) -> str | None:
        c = cfg.algorithm.options(FedCMIOptions)
        if not c.infiltration or c.lambda_inf == 0:
            return None  # cross-entropy and the unimodal terms: a sum over examples
        return ("FedCMI's infiltration weighs each example's distillation by class temperatures and a dominance "
                "direction decided from all of the client's examples (their class confidence), so one example "
                "moves every other example's loss; set algorithm.fedcmi.infiltration false to train FedCMI's "
                "per-example terms (cross-entropy and the unimodal heads) with DP-SGD")

    @classmethod
    def build_network(cls, cfg: Config, spec: DatasetSpec) -> MultimodalNet:
        m = cfg.model
        a, b = spec.modalities
        return FedCMINet((a, b), spec.shapes, m.encoders, spec.num_classes, m.embed_dim, m.width, m.projector,
                         m.projectors, m.fusion, spec.vocab_sizes)

    def _temperatures(self, dom: Dominance) -> torch.Tensor:
        c = self.options(FedCMIOptions)
        if c.class_temperature:
            return class_temperatures(dom, c.beta, c.min_temperature)
        return torch.full_like(dom.rho, c.temperature)

    @torch.no_grad()
    def class_confidence(self, model: FedCMINet, ctx: ClientContext, num_classes: int
                         ) -> tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        """Per modality, the per-class sums of the true-class probability of the received model over the
        client's data; and the class counts."""
        was_training = model.training
        model.eval()
        sums = [torch.zeros(num_classes, dtype=torch.float64) for _ in model.modalities]
        counts = torch.zeros(num_classes, dtype=torch.float64)
        for x, y in ctx.device_batches(0):
            out = model(x)
            for i, m in enumerate(model.modalities):
                s, cnt = true_class_probs(out.uni_logits[m], y, num_classes)
                sums[i] += s.cpu()
            counts += cnt.cpu()
        model.train(was_training)
        return (sums[0], sums[1]), counts

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        if not isinstance(model, FedCMINet):
            raise TypeError(f"FedCMI trains a FedCMINet, not a {type(model).__name__}")
        c = self.options(FedCMIOptions)
        mods = model.modalities
        num_classes = model.num_classes
        multimodal = len(ctx.modalities) == 2
        first = c.first_distillation_round(ctx.cfg.federation.local_epochs)
        use_inf = multimodal and c.infiltration and c.lambda_inf > 0 and ctx.rounds_done >= first
        metrics: dict = {}
        teacher: FedCMINet | None = None
        round_dom: Dominance | None = None
        round_temps: torch.Tensor | None = None
        temps_by_direction: list[torch.Tensor] = []
        if use_inf:
            teacher = copy.deepcopy(model).eval()
            teacher.requires_grad_(False)
            confidence = self.class_confidence(teacher, ctx, num_classes)
            decided = decide_dominance(*confidence)
            decided_temps = self._temperatures(decided)
            metrics["rho_bar"] = decided.rho_bar
            metrics["temperatures"] = [round(float(t), 6) for t in decided_temps]
            if c.dominance == "round":
                round_dom, round_temps = decided, decided_temps
                metrics["dominant"] = mods[decided.dominant]
            else:  # the direction follows each batch; the temperatures stay the round's, for either direction
                temps_by_direction = [self._temperatures(directed_dominance(*confidence, d)) for d in (0, 1)]
        dom_counts = {m: 0 for m in mods}

        def loss_fn(m: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, float]]:
            assert isinstance(m, FedCMINet)
            out = m(x)
            loss = F.cross_entropy(out.mm_logits, y)
            terms = {"ce": loss.item()}
            if not multimodal:
                return loss, terms
            uni = F.cross_entropy(out.uni_logits[mods[0]], y) + F.cross_entropy(out.uni_logits[mods[1]], y)
            loss = loss + c.w_uni * uni
            terms["uni"] = uni.item()
            if use_inf:
                assert teacher is not None
                dom, temps = round_dom, round_temps
                if dom is None:  # the direction per batch, on the current local model
                    with torch.no_grad():
                        sums = [true_class_probs(out.uni_logits[k].detach(), y, num_classes) for k in mods]
                    dom = decide_dominance((sums[0][0], sums[1][0]), sums[0][1])
                    temps = temps_by_direction[dom.dominant]
                assert temps is not None
                d_mod, w_mod = mods[dom.dominant], mods[1 - dom.dominant]
                dom_counts[d_mod] += 1
                with torch.no_grad():
                    t_logits = teacher.classifiers[d_mod](teacher.self_proj[d_mod](teacher.encoders[d_mod](x[d_mod])))
                s_logits = m.classifiers[w_mod](out.z_inf[w_mod])
                inf = infiltration_loss(t_logits, s_logits, temps.to(y.device)[y], c.t_squared)
                loss = loss + c.lambda_inf * inf
                terms["inf"] = inf.item()
            return loss, terms

        metrics.update(local_sgd(model, ctx, loss_fn, mu=self.cfg.algorithm.mu))
        if use_inf and c.dominance == "batch":
            metrics["dominant"] = max(dom_counts, key=lambda k: dom_counts[k])
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)

    def algorithm_summary(self, updates: Sequence[ClientUpdate]) -> dict[str, float]:
        """The share of clients that found each modality dominant, and the mean class temperatures."""
        out: dict[str, float] = {}
        mods = self.cfg.data.modalities
        decided = [u.metrics["dominant"] for u in updates if "dominant" in u.metrics]
        if decided:
            for m in mods:
                out[f"dominant_frac_{m}"] = decided.count(m) / len(decided)
        temps = [u.metrics["temperatures"] for u in updates if "temperatures" in u.metrics]
        if temps:
            for k in range(len(temps[0])):
                out[f"temperature_class_{k}"] = sum(t[k] for t in temps) / len(temps)
        return out
