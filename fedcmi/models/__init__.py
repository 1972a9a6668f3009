"""Model construction from the config and the dataset spec."""

from __future__ import annotations

import torch

from fedcmi.config import Config
from fedcmi.data.base import DatasetSpec
from fedcmi.models.encoders import EncoderError, build_encoder
from fedcmi.models.networks import FedCMINet, FusionNet, MultimodalNet, Output

__all__ = ["build_model", "FedCMINet", "FusionNet", "MultimodalNet", "Output", "EncoderError", "build_encoder"]


def build_model(cfg: Config, spec: DatasetSpec) -> MultimodalNet:
    """The network ``cfg.algorithm.name`` trains, initialised from ``cfg.seed``.

    The initialisation draws from torch's global generator seeded with ``cfg.seed``, inside a fork of it,
    so building a model leaves the caller's random state as it was.
    """
    from fedcmi.algorithms import strategy_class

    if tuple(spec.modalities) != tuple(cfg.data.modalities):
        raise EncoderError(
            f"the prepared data holds modalities {list(spec.modalities)}, params say data.modalities="
            f"{list(cfg.data.modalities)}; rerun `fedcmi prepare`"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return strategy_class(cfg.algorithm.name).build_network(cfg, spec)
