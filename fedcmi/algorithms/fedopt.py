"""FedAvgM and FedAdam: FedAvg's client update with a server optimiser (Reddi et al., "Adaptive Federated
Optimization", ICLR 2021; FedAvgM: Hsu et al., "Measuring the Effects of Non-Identical Data Distribution
for Federated Visual Classification", 2019).

The server step itself is :class:`fedcmi.round.server_optimizer.ServerOptimizer`; ``server.optimizer`` puts
it after any other algorithm's aggregation (FedCMI with server momentum: ``algorithm.name: fedcmi``,
``server.optimizer: momentum``).
"""

from __future__ import annotations

from fedcmi.algorithms.fedavg import FedAvg


class FedAvgM(FedAvg):
    """FedAvg whose server takes the aggregate's change as a pseudo-gradient with momentum
    (``server.momentum``, ``server.lr``: 1.0 unless set)."""

    name = "fedavgm"
    server_optimizer = "momentum"


class FedAdam(FedAvg):
    """FedAvg whose server takes the aggregate's change as a pseudo-gradient for Adam without bias
    correction (``server.betas``, ``server.tau``, ``server.lr``: 0.01 unless set)."""

    name = "fedadam"
    server_optimizer = "adam"
