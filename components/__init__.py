"""Kubeflow Pipelines components: one lightweight Python component per step of a round.

Each component is a thin call into :mod:`fedcmi.runners.store` (no training
logic here): begin, train a worker's clients, conclude a round, finish, and the
exit handler. They run in the project's image (:func:`make_components` takes
it); models pass between them as KFP ``Model`` artifacts in the core's
safetensors format, the config as one JSON string, and the prepared data and the
federation's store live on the data volume every step mounts. Each round's
figures are also the conclude step's ``Metrics`` artifact
(:class:`~fedcmi_components.sinks.KfpMetrics`), so the KFP UI shows every round.
"""

from fedcmi_components.tasks import make_components

__all__ = ["make_components"]
