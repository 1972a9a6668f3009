"""Federated algorithms behind one interface; :func:`get_strategy` picks one by name."""

from __future__ import annotations

from fedcmi.algorithms.aggregation import (
    Accumulator,
    ClientUpdate,
    UpdateRejected,
    check_update,
    fedavg,
    modality_aware_fedavg,
)
from fedcmi.algorithms.base import ClientContext, Strategy, derive_seed
from fedcmi.algorithms.baselines import OGMGE, FedAvg, FedProx, Unimodal
from fedcmi.algorithms.fedcmi import FedCMI
from fedcmi.config import Config

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedAvg, FedProx, Unimodal, OGMGE, FedCMI)}

__all__ = [
    "Accumulator", "ClientUpdate", "UpdateRejected", "check_update", "fedavg", "modality_aware_fedavg",
    "ClientContext", "Strategy", "derive_seed", "STRATEGIES", "get_strategy",
]


def get_strategy(cfg: Config) -> Strategy:
    return STRATEGIES[cfg.algorithm.name](cfg)
