"""One MLflow run per federation, whoever executes it.

``fedcmi train`` and the Kubeflow pipeline's steps open, log into and end a federation's run through
:class:`TrainingRun` alone. The run is driven through :class:`mlflow.MlflowClient` with an explicit run id
(no fluent active run is left for MLflow's exit handler to retry against a server that went away), and
every call goes through :class:`~fedcmi.tracking.calls.ResilientCalls`. The run's record file,
``mlflow_run.json`` (:data:`RUN_INFO`), is this module's: written when the run opens (so a restarted
training, or the next step of a pipeline, finds it) and again when it ends, with what was logged.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.errors import one_line
from fedcmi.io import JsonFileError, read_json, write_json
from fedcmi.tracking.calls import ResilientCalls
from fedcmi.tracking.inputs import data_hash, dataset_input, git_commit
from fedcmi.tracking.server import TrackingUnavailable, apply_http_limits, check_reachable, tracking_uri

if TYPE_CHECKING:  # serving loads MLflow's model flavours and torch: only where a model is logged
    from fedcmi.serving import ModelPackage

log = logging.getLogger("fedcmi")

#: The run's record file, in a training's output folder or a pipeline's store.
RUN_INFO = "mlflow_run.json"
EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's "model training" view, not the GenAI one


def read_run_info(path: Path) -> dict:
    """``mlflow_run.json``, checked: a damaged one is one :class:`~fedcmi.io.JsonFileError` naming it."""
    info = read_json(path, expect=dict)
    bad = [k for k in ("run_id", "model_uri", "tracking_uri", "experiment")
           if info.get(k) is not None and not isinstance(info[k], str)]
    if bad or (info.get("run_id") is not None and not str(info["run_id"]).isalnum()):
        raise JsonFileError(f"{path} is damaged ({', '.join(bad) or 'run_id'} is not what `fedcmi train` writes); "
                            "rerun `fedcmi train`")
    return info


def write_run_info(path: Path, info: dict) -> None:
    write_json(path, info)


def record_disabled(path: Path) -> None:
    """The record of a training that tracked nothing (``tracking.enabled`` false, or ``--no-tracking``)."""
    write_json(path, {"run_id": None, "reason": "tracking disabled"})


def _experiment_id(client: Any, name: str, registered_model: str | None = None) -> str:
    """The id of experiment ``name``, created if missing (another process may create it first), marked as
    a model-training experiment whose description links the registered model."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            exp = client.get_experiment(client.create_experiment(name))
        except MlflowException:
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get("mlflow.experimentKind") != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, "mlflow.experimentKind", EXPERIMENT_KIND)
    if registered_model and "mlflow.note.content" not in exp.tags:
        client.set_experiment_tag(exp.experiment_id, "mlflow.note.content",
                                  f"Federated multimodal training (fedcmi). Registered model: "
                                  f"[{registered_model}](#/models/{registered_model})")
    return str(exp.experiment_id)


def reopen_run(info_file: Path, uri: str) -> str | None:
    """The run recorded in ``info_file``, set RUNNING again, when it was made on ``uri`` and is still there;
    None otherwise (no record, another server, a deleted run)."""
    from mlflow import MlflowClient

    try:
        info = read_run_info(info_file) if Path(info_file).is_file() else {}
    except (ValueError, OSError):
        return None
    if not info.get("run_id") or info.get("tracking_uri") != uri:
        return None
    check_reachable(uri)
    client = MlflowClient(uri)
    try:
        run = client.get_run(info["run_id"])
    except Exception:  # deleted, or another store under the same name: a new run
        return None
    if run.info.lifecycle_stage != "active":
        return None
    client.update_run(info["run_id"], status="RUNNING")
    return str(info["run_id"])


class TrainingRun:
    """The MLflow run of one federation: opened (or reopened), logged into round by round, ended once."""

    def __init__(self, cfg: Config, uri: str, run_id: str, info_file: Path, probe_every: float = 30.0) -> None:
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = uri
        self.run_id = run_id
        self.info_file = Path(info_file)
        self.client = MlflowClient(uri)
        self.calls = ResilientCalls(uri, cfg.tracking.time_budget, probe_every)
        self.model_uri: str | None = None

    # -- the lifecycle -----------------------------------------------------------------------------------
    @classmethod
    def open(cls, cfg: Config, info_file: Path, *, uri: str | None = None, name: str | None = None,
             tags: dict[str, str] | None = None, data: DataModule | None = None, resume: bool = True,
             probe_every: float = 30.0) -> TrainingRun:
        """The federation's run: the one ``info_file`` records when ``resume`` and it is still on the server
        (reopened, RUNNING again), else a new one (the settings that apply logged flat, tags set, ``data``
        logged as its input). The record file is written before anything else is logged. An unreachable
        server, or one whose API fails, is :class:`TrackingUnavailable` before any training."""
        uri = uri or tracking_uri(cfg)
        apply_http_limits(cfg)
        check_reachable(uri)
        run_id = reopen_run(info_file, uri) if resume else None
        if run_id is not None:
            run = cls(cfg, uri, run_id, info_file, probe_every)
            run.model_uri = cls._recorded(info_file).get("model_uri")
            return run
        try:
            run = cls._create(cfg, uri, info_file, name, tags, probe_every)
        except TrackingUnavailable:
            raise
        except Exception as exc:  # /health answers, the API does not: say so before any training
            raise TrackingUnavailable(
                f"tracking server {uri} answers, but opening a run failed ({one_line(exc, 200)}); fix the "
                "server, or run with --set tracking.enabled=false") from None
        write_run_info(run.info_file, {"run_id": run.run_id, "tracking_uri": uri,
                                       "experiment": cfg.tracking.experiment})
        run._log_start(data)
        return run

    @classmethod
    def attach(cls, cfg: Config, info_file: Path, probe_every: float = 30.0) -> TrainingRun:
        """The run ``info_file`` records, to log more into it (a pipeline step after the first)."""
        info = read_run_info(info_file)
        if not info.get("run_id") or not info.get("tracking_uri"):
            raise TrackingUnavailable(f"{info_file} names no MLflow run")
        apply_http_limits(cfg)
        check_reachable(info["tracking_uri"])  # a step that cannot log fails before it commits, and is retried
        run = cls(cfg, info["tracking_uri"], info["run_id"], info_file, probe_every)
        run.model_uri = info.get("model_uri")
        return run

    @staticmethod
    def _recorded(info_file: Path) -> dict:
        try:
            return read_run_info(info_file) if Path(info_file).is_file() else {}
        except (ValueError, OSError):
            return {}

    @classmethod
    def _create(cls, cfg: Config, uri: str, info_file: Path, name: str | None, tags: dict[str, str] | None,
                probe_every: float) -> TrainingRun:
        from mlflow import MlflowClient

        client = MlflowClient(uri)
        all_tags = {"algorithm": cfg.algorithm.name, "data_hash": data_hash(cfg),
                    "config_fingerprint": cfg.fingerprint(), **(tags or {})}
        commit = git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
            all_tags["git_commit"] = commit
        experiment_id = _experiment_id(client, cfg.tracking.experiment, cfg.tracking.registered_model)
        created = client.create_run(experiment_id, run_name=name or f"{cfg.algorithm.name}-seed{cfg.seed}",
                                    tags=all_tags)
        return cls(cfg, uri, created.info.run_id, info_file, probe_every)

    def _log_start(self, data: DataModule | None) -> None:
        from mlflow.entities import Param

        params = [Param(k, str(v)[:500]) for k, v in self.cfg.applicable().items()]
        self.calls.call("params", lambda: self.client.log_batch(self.run_id, params=params))
        if data is not None:
            digest = data_hash(self.cfg)
            self.calls.call("dataset", lambda: self.client.log_inputs(
                self.run_id, datasets=[dataset_input(self.cfg, data, digest)]))
            from mlflow.entities import RunTag

            from fedcmi.protocols import data_card

            card = [RunTag(f"card.{k}", v[:5000]) for k, v in data_card(self.cfg, data.spec).items()]
            self.calls.call("card", lambda: self.client.log_batch(self.run_id, tags=card))

    # -- logging ------------------------------------------------------------------------------------------
    @property
    def errors(self) -> list[str]:
        return self.calls.errors

    @property
    def replayed(self) -> list[str]:
        return self.calls.replayed

    @property
    def unlogged(self) -> list[str]:
        return self.calls.unlogged

    @property
    def spent(self) -> float:
        """Seconds waited on the tracking server (``tracking.time_budget`` bounds it)."""
        return self.calls.spent

    @property
    def out_of_time(self) -> bool:
        return self.calls.out_of_time

    def log_round(self, round_no: int, metrics: dict[str, float]) -> None:
        self.log_metrics(metrics, step=round_no, what=f"round {round_no} metrics")

    def log_metrics(self, metrics: dict[str, float], step: int = 0, what: str = "metrics") -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)  # taken now, so a replay keeps the time the figure was made
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self.calls.call(what, lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).exists():
                self.calls.call(f"artifact {p}", self._artifact_logger(Path(p), artifact_path))

    def _artifact_logger(self, path: Path, artifact_path: str | None):
        return lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: ModelPackage) -> None:
        """Log the model; its URI is in :attr:`model_uri` once logged (after a replay too)."""

        def log() -> str:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            # The model API logs to the fluent active run; open it for this call alone.
            with mlflow.start_run(run_id=self.run_id):
                self.model_uri = model.log()
            return self.model_uri

        self.calls.call("model", log)

    def finish(self, files: list[Path], model: ModelPackage) -> list[str]:
        """What a complete federation leaves: its files (and the partition with its statistics) and its model;
        then the run ends. Returns what was not logged."""
        stats = self.cfg.partition.file.with_name("partition_stats.json")
        self.log_artifacts([*files, stats, self.cfg.partition.file])
        self.log_model(model)
        return self.close()

    def close(self, failed: bool = False) -> list[str]:
        """End the run: FINISHED, or FAILED when ``failed`` or anything was not logged; the record file gets
        what was logged. Returns what was not logged."""
        reachable = None
        if self.calls.unlogged and not self.calls.out_of_time:  # a short outage: wait for it, within the budget
            reachable = self.calls.settle(self.cfg.tracking.close_wait)
        errors = self.calls.errors
        if self.calls.unlogged:
            why = (f"tracking.time_budget ({self.cfg.tracking.time_budget:g} s) was spent" if self.calls.out_of_time
                   else "the tracking server is still unreachable" if reachable is False
                   else "the tracking server still fails")
            errors.append(f"{why}; not logged: {', '.join(self.calls.unlogged)}")
            if self.calls.out_of_time:
                with contextlib.suppress(Exception):  # one last short call, so the run is not left RUNNING
                    self.client.set_terminated(self.run_id, "FAILED")
        else:
            try:
                self.client.set_terminated(self.run_id, "FAILED" if failed or errors else "FINISHED")
            except Exception as exc:
                errors.append(f"end run: {exc.__class__.__name__}")
        self._record()
        return errors

    def fail(self, reason: str) -> list[str]:
        """End the run FAILED: training stopped (checkpoints keep the finished rounds)."""
        self.calls.errors.append(reason)
        return self.close(failed=True)

    def _record(self) -> None:
        info = {"run_id": self.run_id, "tracking_uri": self.uri, "model_uri": self.model_uri,
                "experiment": self.cfg.tracking.experiment, "errors": list(self.calls.errors),
                "replayed": list(self.calls.replayed)}
        with contextlib.suppress(OSError):
            write_run_info(self.info_file, info)


def fail_recorded_run(info_file: Path, reason: str) -> str | None:
    """End the run ``info_file`` records FAILED with the reason as a tag (a pipeline's exit handler); its id,
    or None when no run was opened."""
    from mlflow import MlflowClient

    if not Path(info_file).is_file():
        return None
    info = read_run_info(info_file)
    check_reachable(info["tracking_uri"])
    client = MlflowClient(info["tracking_uri"])
    client.set_tag(info["run_id"], "last_failed_run", reason[:4000])  # kept when a later run finishes it
    client.set_terminated(info["run_id"], "FAILED")
    return str(info["run_id"])


def add_to_run(cfg: Config, info_file: Path, metrics: dict[str, float], artifacts: list[Path]) -> list[str]:
    """Add metrics and artifacts to a finished training run, keeping its status; returns the errors (never raises)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    info = read_run_info(info_file)
    errors: list[str] = []
    apply_http_limits(cfg)
    try:
        check_reachable(info["tracking_uri"])
        client = MlflowClient(info["tracking_uri"])
        ts = int(time.time() * 1000)
        if metrics:
            client.log_batch(info["run_id"], metrics=[Metric(k, float(v), ts, 0) for k, v in metrics.items()])
        for a in artifacts:
            if Path(a).exists():
                client.log_artifact(info["run_id"], str(a), "evaluation")
    except Exception as exc:
        errors.append(one_line(exc, 200))
    return errors
