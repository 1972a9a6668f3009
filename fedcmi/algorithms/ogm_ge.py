"""OGM-GE: Peng et al., "Balanced Multimodal Learning via On-the-fly Gradient Modulation", CVPR 2022."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.algorithms.base import ClientContext, Strategy, local_sgd, snapshot
from fedcmi.algorithms.losses import ogm_coefficients
from fedcmi.config import Config, Float
from fedcmi.models.networks import MultimodalNet
from fedcmi.round.update import ClientUpdate


class OGMOptions(BaseModel):
    """OGM-GE's gradient modulation (``algorithm.ogm``)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    alpha: Float = Field(0.8, ge=0, description="modulation strength: the leader's gradient x 1 - tanh(alpha x ratio)")
    noise: bool = Field(True, description="generalisation enhancement: Gaussian noise of the gradient's spread")


class OGMGE(Strategy):
    """FedAvg with OGM-GE.

    Per batch, each modality's confidence is the summed softmax probability of
    the true class under its uni-modal read-out; the leading modality's encoder
    gradients are scaled by 1 - tanh(alpha * ratio) and, with ``noise``, get
    Gaussian noise of the gradient's own spread (generalisation enhancement).
    """

    name = "ogm_ge"
    Options = OGMOptions
    section = "ogm"

    @classmethod
    def per_sample_obstacle(cls, cfg: Config) -> str | None:
        return ("OGM-GE scales each encoder's gradient by a coefficient computed from the whole batch's scores, "
                "so one example changes every other example's step and clipping each example's gradient bounds "
                "nothing; use a method whose loss is per example (fedavg, fedprox, scaffold, ume, umt)")

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        opts = self.options(OGMOptions)
        mods = model.modalities
        gen = torch.Generator(device="cpu").manual_seed(ctx.seed)
        coeffs: list[tuple[float, float]] = []

        def loss_fn(m: MultimodalNet, x: dict[str, torch.Tensor], y: torch.Tensor
                    ) -> tuple[torch.Tensor, dict[str, float]]:
            out = m(x)
            loss = F.cross_entropy(out.mm_logits, y)
            terms = {"ce": loss.item()}
            if len(out.uni_logits) == 2:
                with torch.no_grad():
                    s = [float(out.uni_logits[k].softmax(1).gather(1, y[:, None]).sum()) for k in mods]
                c0, c1 = ogm_coefficients(s[0], s[1], opts.alpha)
                coeffs.append((c0, c1))
                terms["coeff_" + mods[0]] = c0
                terms["coeff_" + mods[1]] = c1
            return loss, terms

        def modulate(m: MultimodalNet, terms: dict[str, float]) -> None:
            if not coeffs or "coeff_" + mods[0] not in terms:
                return
            c = dict(zip(mods, coeffs[-1], strict=True))
            for name, p in m.named_parameters():
                owner = m.owner(name)
                if owner is None or p.grad is None or c[owner] == 1.0:
                    continue
                p.grad.mul_(c[owner])
                if opts.noise and p.grad.numel() > 1:
                    std = float(p.grad.std())
                    noise = torch.randn(p.grad.shape, generator=gen) * (std + 1e-8)
                    p.grad.add_(noise.to(p.grad.device))

        metrics = local_sgd(model, ctx, loss_fn, grad_hook=modulate)
        return ClientUpdate(ctx.client_id, snapshot(model), ctx.num_examples, ctx.modalities, metrics)
