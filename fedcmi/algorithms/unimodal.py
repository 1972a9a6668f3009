"""Single-modality FedAvg: the reference for what one modality reaches alone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from fedcmi.algorithms.fedavg import FedAvg
from fedcmi.config import Config
from fedcmi.models.networks import FusionNet, MultimodalNet

if TYPE_CHECKING:
    from fedcmi.data.base import DatasetSpec


class Unimodal(FedAvg):
    """FedAvg on one modality alone (``algorithm.modality``); clients without it sit the round out."""

    name = "unimodal"
    reads = ("modality",)

    @classmethod
    def check(cls, cfg: Config) -> None:
        mods = list(cfg.data.modalities)
        if cfg.algorithm.modality not in mods:
            raise ValueError(f"algorithm.modality must be one of {mods} when algorithm.name is 'unimodal'")

    @classmethod
    def build_network(cls, cfg: Config, spec: DatasetSpec) -> MultimodalNet:
        m = cfg.model
        return FusionNet((cls._modality(cfg),), spec.shapes, m.encoders, spec.num_classes, m.embed_dim, m.width,
                         m.fusion, spec.vocab_sizes)

    @staticmethod
    def _modality(cfg: Config) -> str:
        if cfg.algorithm.modality is None:
            raise ValueError("algorithm.modality must be set when algorithm.name is 'unimodal'")
        return cfg.algorithm.modality

    def participates(self, modalities: Sequence[str]) -> bool:
        return self._modality(self.cfg) in modalities

    def batch_modalities(self, modalities: Sequence[str]) -> tuple[str, ...]:
        return (self._modality(self.cfg),)
