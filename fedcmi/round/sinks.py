"""Where a federation's figures go: one interface for every destination.

The in-process engine and the pipeline's steps hand each committed round's :class:`RoundRecord` to every
sink, and the final evaluation once the federation is complete. Implementations: the DVC files
(:class:`fedcmi.outputs.TrainFiles`), MLflow (:class:`fedcmi.tracking.sink.MlflowSink`) and, in the
Kubeflow layer, the run's metrics artifacts. They read the record's typed sections, so a figure added to
the record reaches each of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from fedcmi.metrics import Evaluation
from fedcmi.round.record import RoundRecord


class MetricSink(Protocol):
    """A destination of a federation's figures."""

    def log_round(self, rec: RoundRecord) -> None:
        """A committed (or diverged) round."""

    def log_final(self, final: Evaluation, history: Sequence[RoundRecord]) -> None:
        """The final model's evaluation, once every round is committed."""
