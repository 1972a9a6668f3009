"""The Kubeflow run as a metric sink: a round's figures, and the final evaluation, as KFP ``Metrics``
artifacts, so the KFP UI shows every round (each conclude step's output), not only the final values."""

from collections.abc import Sequence
from typing import Any

from fedcmi.metrics import Evaluation
from fedcmi.round.record import RoundRecord
from fedcmi.tracking.sink import round_metrics


class KfpMetrics:
    """Writes into one ``Output[Metrics]`` artifact (anything with ``log_metric(name, value)``)."""

    def __init__(self, artifact: Any, algorithm: str) -> None:
        self.artifact = artifact
        self.algorithm = algorithm

    def log_round(self, rec: RoundRecord) -> None:
        self.artifact.log_metric("round", float(rec.round))
        for name, value in sorted(round_metrics(rec, self.algorithm).items()):
            self.artifact.log_metric(name, value)

    def log_final(self, final: Evaluation, history: Sequence[RoundRecord]) -> None:
        for name, value in final.flat().items():
            self.artifact.log_metric(name, value)
