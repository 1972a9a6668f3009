"""The registered algorithms: the one place that lists them. :func:`get_strategy` builds one by name.

Adding an algorithm is one file holding a :class:`Strategy` subclass (its name, its settings, its network,
its client update) and one registration: an entry in :data:`BUILT_IN` for this package, or, from any
other installed package, an entry point in the group ``fedcmi.algorithms`` naming the class::

    [project.entry-points."fedcmi.algorithms"]
    mymethod = "my_package.mymethod:MyMethod"
"""

from __future__ import annotations

from importlib.metadata import entry_points

from fedcmi.algorithms.aggregation import Accumulator, ClientUpdate, UpdateRejected, check_update
from fedcmi.algorithms.base import ClientContext, Strategy, derive_seed
from fedcmi.algorithms.fedavg import FedAvg
from fedcmi.algorithms.fedcmi import FedCMI
from fedcmi.algorithms.fedopt import FedAdam, FedAvgM
from fedcmi.algorithms.fedprox import FedProx
from fedcmi.algorithms.mmpareto import MMPareto
from fedcmi.algorithms.ogm_ge import OGMGE
from fedcmi.algorithms.pmr import PMR
from fedcmi.algorithms.scaffold import Scaffold
from fedcmi.algorithms.ume import UME
from fedcmi.algorithms.umt import UMT
from fedcmi.algorithms.unimodal import Unimodal
from fedcmi.config import Config

BUILT_IN: tuple[type[Strategy], ...] = (FedAvg, FedProx, Unimodal, OGMGE, FedCMI, PMR, UMT, UME, MMPareto,
                                        FedAvgM, FedAdam, Scaffold)
ENTRY_POINT_GROUP = "fedcmi.algorithms"


def _registry() -> dict[str, type[Strategy]]:
    found: dict[str, type[Strategy]] = {s.name: s for s in BUILT_IN}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Strategy)) or cls.name != ep.name:
            raise TypeError(f"entry point {ep.name} = {ep.value} is not a Strategy named {ep.name!r}")
        if ep.name in found and found[ep.name] is not cls:
            raise TypeError(f"entry point {ep.value} registers {ep.name!r}, which {found[ep.name].__module__} has")
        found[ep.name] = cls
    return found


STRATEGIES: dict[str, type[Strategy]] = _registry()

__all__ = [
    "Accumulator", "ClientUpdate", "UpdateRejected", "check_update", "ClientContext", "Strategy", "derive_seed",
    "BUILT_IN", "STRATEGIES", "get_strategy", "strategy_class",
]


def strategy_class(name: str) -> type[Strategy]:
    """The registered strategy called ``name``."""
    try:
        return STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; known: {', '.join(STRATEGIES)}") from None


def get_strategy(cfg: Config) -> Strategy:
    return strategy_class(cfg.algorithm.name)(cfg)
