"""FedAvg (McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized Data",
AISTATS 2017) on the plain fusion network."""

from __future__ import annotations

from fedcmi.algorithms.base import ClientContext, Strategy, cross_entropy, local_sgd, snapshot
from fedcmi.models.networks import MultimodalNet
from fedcmi.round.update import ClientUpdate


class FedAvg(Strategy):
    """Local SGD on the multimodal head's cross-entropy; the server averages by sample count."""

    name = "fedavg"

    def proximal_weight(self) -> float:
        """The weight of the pull toward the global model (none for FedAvg)."""
        return 0.0

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        metrics = local_sgd(model, ctx, cross_entropy, mu=self.proximal_weight())
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
