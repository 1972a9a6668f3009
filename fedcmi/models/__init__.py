"""Model construction from the config and the dataset spec."""

from __future__ import annotations

from torch import nn

from fedcmi.config import Config
from fedcmi.data.base import DatasetSpec
from fedcmi.models.encoders import EncoderError, build_encoder
from fedcmi.models.networks import FedCMINet, FusionNet, Output

__all__ = ["build_model", "FedCMINet", "FusionNet", "Output", "EncoderError", "build_encoder"]


def build_model(cfg: Config, spec: DatasetSpec) -> nn.Module:
    """The network ``cfg.algorithm.name`` trains, initialised from ``cfg.seed``."""
    import torch

    if tuple(spec.modalities) != tuple(cfg.data.modalities):
        raise EncoderError(
            f"the prepared data holds modalities {list(spec.modalities)}, params say data.modalities="
            f"{list(cfg.data.modalities)}; rerun `fedcmi prepare`"
        )
    m = cfg.model
    torch.manual_seed(cfg.seed)
    if cfg.algorithm.name == "fedcmi":
        return FedCMINet(
            spec.modalities, spec.shapes, m.encoders, spec.num_classes, m.embed_dim, m.width,
            m.projector, m.projectors, m.fusion, spec.vocab_sizes,
        )
    mods = (cfg.algorithm.modality,) if cfg.algorithm.name == "unimodal" else spec.modalities
    return FusionNet(mods, spec.shapes, m.encoders, spec.num_classes, m.embed_dim, m.width, m.fusion,
                     spec.vocab_sizes)
