"""A round's typed record as MLflow metrics, grouped by the record's sections so the run page shows them
apart: ``eval/`` (the evaluation; ``eval_per_class/`` for each class), ``train/`` (the clients' figures),
``round/`` (participation and timing), ``server/`` (the server stages' figures) and the algorithm's own
(``fedcmi/`` for FedCMI). The step is the round."""

from __future__ import annotations

from collections.abc import Sequence

from fedcmi.metrics import Evaluation
from fedcmi.round.record import RoundRecord
from fedcmi.tracking.run import TrainingRun


def round_metrics(rec: RoundRecord, algorithm: str) -> dict[str, float]:
    """A round record's numbers under their MLflow names."""
    p, t = rec.participation, rec.timing
    out = {"round/seconds": float(round(t.seconds, 4)), "round/threads": float(t.threads),
           "round/accepted_clients": float(len(p.accepted)), "round/rejected_clients": float(len(p.rejected))}
    if p.idle:
        out["round/idle_clients"] = float(len(p.idle))
    if p.clipped is not None:
        out["round/clipped_clients"] = float(p.clipped)
    if p.late:
        out["round/late_clients"] = float(len(p.late))
    if t.simulated is not None:
        out["round/simulated_seconds"] = float(round(t.simulated, 6))
    if t.workers is not None:
        out["round/workers"] = float(t.workers)
    if rec.diverged:
        out["round/diverged"] = 1.0
    out.update({f"train/{k}": float(v) for k, v in rec.train.items()})
    out.update({f"server/{k}": float(v) for k, v in rec.server.items()})
    out.update({f"{algorithm}/{k}": float(v) for k, v in rec.algorithm.items()})
    if rec.evaluation is not None:
        for name, value, meta in rec.evaluation.items():
            if meta["per"] == "class":
                out["eval_per_class/acc_" + name.rsplit("_", 1)[1]] = value
            else:
                out["eval/" + name] = value
    return out


class MlflowSink:
    """Each committed round's figures into a :class:`TrainingRun` (queued while the server is away)."""

    def __init__(self, run: TrainingRun) -> None:
        self.run = run

    def backfill(self, history: Sequence[RoundRecord]) -> list[int]:
        """Log the committed rounds the run lacks (a run an outage cut short, continued by a rerun): those
        with no ``round/seconds`` at their step. Returns them."""
        try:
            have = {m.step for m in self.run.client.get_metric_history(self.run.run_id, "round/seconds")}
        except Exception:  # the server is away: the rerun's own calls queue and report as usual
            return []
        missing = [r for r in history if r.round not in have]
        for rec in missing:
            self.log_round(rec)
        return [r.round for r in missing]

    def log_round(self, rec: RoundRecord) -> None:
        self.run.log_round(rec.round, round_metrics(rec, self.run.cfg.algorithm.name))

    def log_final(self, final: Evaluation, history: Sequence[RoundRecord]) -> None:
        """Nothing: the final figures are the last round's, already logged at its step."""
