"""UME, the uni-modal ensemble (Du, Teng, Wang, Wei, Zhang, Zhao, "On Uni-Modal Feature Learning in
Supervised Multi-Modal Learning", ICML 2023), adapted to federated learning.

Each modality is a model of its own (encoder and linear classifier) trained on its own cross-entropy, so
neither can crowd the other out; the multimodal prediction sums their logits. A client trains the
modalities it holds (a single-modality client trains its one), and the server averages each modality's
model over the clients holding it (modality-aware).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from fedcmi.algorithms.base import ClientContext, Strategy, local_sgd, snapshot
from fedcmi.config import Config
from fedcmi.models.networks import EnsembleNet, MultimodalNet
from fedcmi.round.update import ClientUpdate

if TYPE_CHECKING:
    from fedcmi.data.base import DatasetSpec


def ensemble_loss(uni_logits: Mapping[str, torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """The sum of each present modality's own cross-entropy (never the cross-entropy of the summed logits,
    which would train the modalities jointly again)."""
    terms = {f"ce_{m}": F.cross_entropy(lg, y) for m, lg in uni_logits.items()}
    loss = torch.stack(list(terms.values())).sum()
    return loss, {k: v.item() for k, v in terms.items()}


class UME(Strategy):
    """Uni-modal models trained apart, ensembled at prediction time."""

    name = "ume"
    aggregation = "modality_aware"

    @classmethod
    def build_network(cls, cfg: Config, spec: DatasetSpec) -> MultimodalNet:
        m = cfg.model
        return EnsembleNet(spec.modalities, spec.shapes, m.encoders, spec.num_classes, m.embed_dim, m.width,
                           spec.vocab_sizes)

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        def loss_fn(m: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, float]]:
            return ensemble_loss(m(x).uni_logits, y)

        metrics = local_sgd(model, ctx, loss_fn)
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
