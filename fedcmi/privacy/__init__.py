"""Client-level differential privacy of the global model: DP-FedAvg with fixed or adaptive clipping
(:mod:`~fedcmi.privacy.stage`), accounted per modality group with the ``dp-accounting`` library
(:mod:`~fedcmi.privacy.accounting`), its composition with the other server settings checked at load
(:mod:`~fedcmi.privacy.checks`)."""
