"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020): FedAvg's client update corrected for client drift by control variates.

Every local step's gradient gets ``c - c_i`` (the server's control variate minus the client's); after the
client's K steps it sends its new ``c_i+ = c_i - c + (x - y) / (K lr_eff)`` (the paper's option II, with
lr_eff = lr / (1 - optim.momentum) for the local momentum the paper's plain SGD does not have) with its
model, and the server keeps it for that client's next round and moves ``c`` by the mean change over all
N clients. Client state that survives rounds: it lives under ``aux/control/`` in the federation's state,
so checkpoints, resume after a kill and the pipeline's global-state artifact carry it, and a client reads
only its own. ``algorithm.control_variates: true`` puts the same correction on any algorithm whose
clients train through :func:`~fedcmi.algorithms.base.local_sgd` (FedCMI, FedProx, OGM-GE, ...).
"""

from __future__ import annotations

from fedcmi.algorithms.fedavg import FedAvg


class Scaffold(FedAvg):
    """FedAvg with SCAFFOLD's control variates (the correction in :class:`fedcmi.algorithms.base._Drift`,
    the server side in :class:`fedcmi.round.client_state.ControlVariates`)."""

    name = "scaffold"
    control_variates = True
