"""A comparison in MLflow: one parent run, one child run per trial, the report as the parent's artifacts.

The parent's id is kept in the work folder, so a rerun continues the same parent and logs only the trials
it has no child for yet. Only this (the comparing) process writes to the store: the trials run with
tracking off, so a SQLite store never sees two writers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedcmi.compare import Plan, Trial
from fedcmi.config import Config
from fedcmi.io import read_json, write_json
from fedcmi.tracking.server import check_reachable, tracking_uri

PARENT_FILE = "mlflow_parent.json"
#: the tag that names a child's trial, so a rerun finds what it logged already
TRIAL_TAG = "fedcmi.trial"


class ComparisonRun:
    """The parent run of a comparison and its children."""

    def __init__(self, cfg: Config, work: Path, plan: Plan, title: str, card: dict[str, str]) -> None:
        from mlflow import MlflowClient

        from fedcmi.tracking.run import _experiment_id

        self.uri = tracking_uri(cfg)
        check_reachable(self.uri)
        self.client = MlflowClient(self.uri)
        self.file = Path(work) / PARENT_FILE
        known = read_json(self.file, expect=dict) if self.file.is_file() else {}
        self.parent_id: str = known.get("run_id", "")
        if self.parent_id:
            self.client.update_run(self.parent_id, status="RUNNING")
        else:
            exp = _experiment_id(self.client, cfg.tracking.experiment)
            tags = {"fedcmi.kind": "comparison", **{f"card.{k}": v for k, v in card.items()}}
            run = self.client.create_run(exp, run_name=title[:200], tags=tags)
            self.parent_id = run.info.run_id
            params = {"metric": plan.metric, "baseline": plan.baseline, "seeds": str(plan.seeds),
                      "select_seeds": str(plan.select_seeds), "start_lrs": str(plan.lrs),
                      "max_extensions": str(plan.max_extensions), "methods": ", ".join(m.name for m in plan.methods),
                      "extra": ", ".join(plan.extra)[:500]}
            from mlflow.entities import Param

            self.client.log_batch(self.parent_id, params=[Param(k, v) for k, v in params.items()])
            write_json(self.file, {"run_id": self.parent_id, "uri": self.uri})
        self.experiment_id = self.client.get_run(self.parent_id).info.experiment_id
        self.logged = {r.data.tags.get(TRIAL_TAG) for r in self._children()}

    def _children(self) -> list[Any]:
        return list(self.client.search_runs([self.experiment_id],
                                            f"tags.mlflow.parentRunId = '{self.parent_id}'", max_results=5000))

    def log_trial(self, trial: Trial, result: dict, overrides: Sequence[str]) -> None:
        """One child run: the trial's settings, its validation and test figures, its curve."""
        if trial.key in self.logged:
            return
        from mlflow.entities import Metric, Param

        child = self.client.create_run(self.experiment_id, run_name=trial.key,
                                       tags={"mlflow.parentRunId": self.parent_id, TRIAL_TAG: trial.key,
                                             **({"diverged": result["diverged"][:500]} if "diverged" in result
                                                else {})})
        cid = child.info.run_id
        params = [Param("method", trial.method), Param("optim.lr", f"{trial.lr:g}"), Param("seed", str(trial.seed)),
                  Param("overrides", ", ".join(overrides)[:500])]
        metrics = [Metric(f"{split}_{k}", float(v), 0, 0) for split in ("val", "test")
                   for k, v in result[split].items() if isinstance(v, (int, float))]
        metrics += [Metric(k, float(v), 0, int(point["round"])) for point in result.get("curve", [])
                    for k, v in point.items() if k != "round"]
        metrics.append(Metric("seconds", float(result["seconds"]), 0, 0))
        for i in range(0, len(metrics), 900):  # MLflow takes at most 1000 metrics per batch
            self.client.log_batch(cid, metrics=metrics[i:i + 900], params=params if i == 0 else [])
        self.client.set_terminated(cid, "FAILED" if "diverged" in result else "FINISHED")
        self.logged.add(trial.key)

    def finish(self, files: Sequence[Path], summary: dict) -> str:
        """The report and the summary as the parent's artifacts; the parent ends FINISHED. Returns its id."""
        for f in files:
            self.client.log_artifact(self.parent_id, str(f), artifact_path="report")
        from mlflow.entities import Metric

        metric = summary["metric"]
        means = [Metric(_clean(f"{name}_{metric}"), sum(r[metric] for r in m["test"]) / len(m["test"]), 0, 0)
                 for name, m in summary["methods"].items()]
        self.client.log_batch(self.parent_id, metrics=means)
        self.client.set_tag(self.parent_id, "fedcmi.summary", json.dumps(
            {n: m["chosen_lr"] for n, m in summary["methods"].items()})[:5000])
        self.client.set_terminated(self.parent_id, "FINISHED")
        return self.parent_id


def _clean(name: str) -> str:
    """A metric name MLflow accepts: letters, digits and ``_-. /`` only."""
    return "".join(c if c.isalnum() or c in "_-. /" else "_" for c in name)
