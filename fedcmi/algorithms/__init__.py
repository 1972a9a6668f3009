"""Federated algorithms, one module each (:class:`~fedcmi.algorithms.base.Strategy` subclasses).

Adding an algorithm is one file in this package holding a ``Strategy`` subclass with a ``name`` (its
settings, its network, its client update); from any other installed package, an entry point in the group
``fedcmi.algorithms`` naming the class::

    [project.entry-points."fedcmi.algorithms"]
    mymethod = "my_package.mymethod:MyMethod"

:data:`fedcmi.registry.ALGORITHMS` finds both; :func:`get_strategy` builds the configured one.
"""

from __future__ import annotations

import torch

from fedcmi.algorithms.base import Strategy
from fedcmi.config import Config
from fedcmi.data.base import DatasetSpec
from fedcmi.models import EncoderError, MultimodalNet
from fedcmi.registry import ALGORITHMS

__all__ = ["build_model", "get_strategy", "strategy_class"]


def strategy_class(name: str) -> type[Strategy]:
    """The registered strategy called ``name``."""
    cls = ALGORITHMS.get(name)
    assert issubclass(cls, Strategy)
    return cls


def get_strategy(cfg: Config) -> Strategy:
    return strategy_class(cfg.algorithm.name)(cfg)


def build_model(cfg: Config, spec: DatasetSpec) -> MultimodalNet:
    """The network ``cfg.algorithm.name`` trains, initialised from ``cfg.seed``.

    The initialisation draws from torch's global generator seeded with ``cfg.seed``, inside a fork of it,
    so building a model leaves the caller's random state as it was.
    """
    if tuple(spec.modalities) != tuple(cfg.data.modalities):
        raise EncoderError(
            f"the prepared data holds modalities {list(spec.modalities)}, params say data.modalities="
            f"{list(cfg.data.modalities)}; rerun `fedcmi prepare`"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return strategy_class(cfg.algorithm.name).build_network(cfg, spec)
