"""UMT, the uni-modal teacher (Du, Teng, Wang, Wei, Zhang, Zhao, "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023), adapted to federated learning.

Two stages within one federation. For the first ``teacher_rounds`` rounds the clients train a uni-modal
teacher per modality they hold (encoder and linear classifier, each on its own cross-entropy, as UME). From
then on the teachers are frozen and the multimodal student (the plain fusion network) trains on

    CE(F(h_a, h_b), y) + distill_weight * sum_m mean((h_m - t_m)^2)

where t_m is the frozen teacher's feature of modality m: each student encoder is held to features that
were learnt without the other modality, so the dominant one cannot leave the weak one untrained. The
server averages each modality's parameters over the clients holding it (modality-aware).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.algorithms.base import ClientContext, Strategy, local_sgd, snapshot
from fedcmi.algorithms.ume import ensemble_loss
from fedcmi.config import Config, Float, Int
from fedcmi.models.networks import MultimodalNet, TeacherStudentNet
from fedcmi.round.update import ClientUpdate

if TYPE_CHECKING:
    from fedcmi.data.base import DatasetSpec


class UMTOptions(BaseModel):
    """The uni-modal teacher's settings (``algorithm.umt``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    teacher_rounds: Int = Field(10, ge=1, le=100_000, description="rounds that train the uni-modal teachers "
                                "before the student (a count, not a fraction, so a resumed run keeps its stages)")
    distill_weight: Float = Field(1.0, ge=0, description="weight of the feature distillation to the teachers")


def feature_distillation(student: dict[str, torch.Tensor], teacher: dict[str, torch.Tensor]) -> torch.Tensor:
    """sum over the present modalities of mean((h_m - t_m)^2), the teachers' features detached."""
    return torch.stack([F.mse_loss(student[m], teacher[m].detach()) for m in student]).sum()


class UMT(Strategy):
    """Uni-modal teachers first, then the multimodal student distilled toward their features."""

    name = "umt"
    Options = UMTOptions
    aggregation = "modality_aware"

    @classmethod
    def check(cls, cfg: Config) -> None:
        t = cfg.algorithm.options(UMTOptions).teacher_rounds
        if t >= cfg.federation.rounds:
            raise ValueError(f"algorithm.umt.teacher_rounds ({t}) leaves no round for the student: it must be "
                             f"below federation.rounds ({cfg.federation.rounds})")

    @classmethod
    def build_network(cls, cfg: Config, spec: DatasetSpec) -> MultimodalNet:
        m = cfg.model
        return TeacherStudentNet(spec.modalities, spec.shapes, m.encoders, spec.num_classes, m.embed_dim,
                                 m.width, m.fusion, spec.vocab_sizes)

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        if not isinstance(model, TeacherStudentNet):
            raise TypeError(f"UMT trains a TeacherStudentNet, not a {type(model).__name__}")
        opts = self.options(UMTOptions)
        teaching = ctx.rounds_done < opts.teacher_rounds
        frozen = [p for name, p in model.named_parameters()
                  if name.startswith(("teachers.", "classifiers.")) != teaching]
        for p in frozen:  # the other stage's parameters stay exactly as received
            p.requires_grad_(False)

        def teacher_loss(m: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, float]]:
            assert isinstance(m, TeacherStudentNet)
            return ensemble_loss({k: lg for k, (_, lg) in m.teach(x).items()}, y)

        def student_loss(m: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                         ) -> tuple[torch.Tensor, dict[str, float]]:
            assert isinstance(m, TeacherStudentNet)
            out = m(x)
            ce = F.cross_entropy(out.mm_logits, y)
            with torch.no_grad():
                t = {k: h for k, (h, _) in m.teach(x).items()}
            distill = feature_distillation(out.h, t)
            return ce + opts.distill_weight * distill, {"ce": ce.item(), "distill": distill.item()}

        try:
            metrics = local_sgd(model, ctx, teacher_loss if teaching else student_loss)
        finally:
            for p in frozen:
                p.requires_grad_(True)
        metrics["stage"] = 0 if teaching else 1
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
