"""FedProx (Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020)."""

from __future__ import annotations

from fedcmi.algorithms.fedavg import FedAvg


class FedProx(FedAvg):
    """FedAvg plus (mu / 2) ||w - w_G||^2 in every local step (``algorithm.mu``)."""

    name = "fedprox"
    reads = ("mu",)

    def proximal_weight(self) -> float:
        return self.cfg.algorithm.mu
