"""MLflow tracking and the model registry.

One MLflow run per training run. Logging never stops training: if the server
goes away mid-run, the error is kept, training goes on, every metric still
lands in the local files, and :meth:`RunTracker.close` reports what failed.
An unreachable server is reported *before* training starts.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedcmi.config import Config

if TYPE_CHECKING:
    from fedcmi.data import DataModule
    from fedcmi.serving import ModelPackage

log = logging.getLogger("fedcmi")
DEFAULT_URI = "sqlite:///mlflow.db"


class TrackingUnavailable(RuntimeError):
    """The configured tracking server cannot be reached."""


def tracking_uri(cfg: Config) -> str:
    """``MLFLOW_TRACKING_URI`` wins over params; the default is a SQLite store in the project."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking.tracking_uri or DEFAULT_URI


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """Fail fast with a clear message when an HTTP tracking server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    url = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - the user's own server
            if resp.status >= 500:
                raise TrackingUnavailable(f"tracking server {uri} answered {resp.status} on /health")
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise TrackingUnavailable(f"tracking server {uri} answered {exc.code} on /health") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingUnavailable(
            f"tracking server {uri} is unreachable ({reason}); start it, fix MLFLOW_TRACKING_URI / "
            "tracking.tracking_uri, or run with --set tracking.enabled=false"
        ) from None


#: MLflow's client limits, by the tracking setting that gives them (an environment variable set by the user wins).
HTTP_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "request_timeout", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "max_retries"}
_applied: dict[str, str] = {}  # what apply_http_limits set, so that a value set by anyone else is left alone
SLOW_CALL_SECONDS = 5.0


def apply_http_limits(cfg: Config) -> None:
    """Bound every request to the tracking server: MLflow's own defaults retry a failing request for about
    four minutes (7 retries, backoff factor 2) and wait up to 120 s for each answer."""
    wanted = {var: str(math.ceil(getattr(cfg.tracking, field))) for var, field in HTTP_LIMITS.items()}
    wanted["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    for var, value in wanted.items():
        if var not in os.environ or os.environ[var] == _applied.get(var):
            os.environ[var] = _applied[var] = value


def transient(exc: BaseException) -> bool:
    """Whether a failed tracking call may succeed when sent again: anything but the server refusing the
    request itself (a 4xx other than timeout and rate limits) is taken as passing."""
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        try:
            status = int(exc.get_http_status_code())
        except (TypeError, ValueError, AttributeError):
            return True
        return not (400 <= status < 500 and status not in (408, 429))
    return True


def _one_line(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def data_hash(cfg: Config, verify: bool = False) -> str:
    """The prepared data's identity: the SHA-256 of its arrays, recorded by ``fedcmi prepare`` in its
    meta.json (the same in `dvc repro`, in a pipeline's pods and on any machine); a hash of the meta file
    for a folder prepared before the content hash was recorded.

    ``verify`` hashes the arrays again (what registering does, once): arrays changed by hand since
    ``prepare`` are an error, so versions measured on other data are never compared as equals.
    """
    meta = Path(cfg.data.prepared_dir) / "meta.json"
    if not meta.is_file():
        return "unknown"
    try:
        content = json.loads(meta.read_text()).get("content_sha256")
    except (ValueError, OSError):
        content = None
    if isinstance(content, str) and content:
        if verify:
            from fedcmi.data.base import content_hash
            from fedcmi.errors import CommandError

            if content_hash(Path(cfg.data.prepared_dir)) != content:
                raise CommandError(f"the prepared data in {cfg.data.prepared_dir} changed after `fedcmi prepare` "
                                   "recorded its hash (edited by hand?); rerun `fedcmi prepare` and evaluate again "
                                   "before registering")
        return "sha256:" + content[:32]
    return "meta:" + hashlib.sha256(meta.read_bytes()).hexdigest()[:16]


#: Evaluation figures of a round (see :mod:`fedcmi.evaluation`), grouped as ``eval/...`` in MLflow.
EVAL_KEYS = ("mm_", "uni_acc_", "path_acc_", "probe_acc_", "worst_class_acc", "class_acc_spread",
             "imbalance_ratio", "pred_top_frac")
ROUND_KEYS = ("seconds", "threads", "workers")


def metric_name(key: str, algorithm: str) -> str:
    """The MLflow name of a round record's figure: grouped by prefix, so the run page shows sections
    (``eval/``, ``eval_per_class/``, ``train/``, ``round/``, and the algorithm's own, e.g. ``fedcmi/``)
    instead of one alphabetical list; history.json keeps the flat keys that DVC plots read."""
    if key.startswith("train_"):
        return "train/" + key[len("train_"):]
    if key.startswith("class_acc_") and key[len("class_acc_"):].isdigit():
        return "eval_per_class/acc_" + key[len("class_acc_"):]
    if key.startswith(EVAL_KEYS):
        return "eval/" + key
    if key in ROUND_KEYS:
        return "round/" + key
    return f"{algorithm}/{key}"


def round_metrics(rec: dict, algorithm: str) -> dict[str, float]:
    """A round record's numbers under their MLflow names, with the round's client counts."""
    out = {metric_name(k, algorithm): float(v) for k, v in rec.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "round"}
    out["round/accepted_clients"] = float(len(rec.get("accepted", [])))
    out["round/rejected_clients"] = float(len(rec.get("rejected", {})))
    return out


def dataset_input(cfg: Config, data: DataModule, digest: str) -> Any:
    """The prepared data as an MLflow dataset input (context ``training``): its digest is the data hash
    the run is tagged with (the content hash of its arrays), its schema the modalities' shapes and dtypes."""
    import warnings

    import numpy as np
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    from fedcmi.serving import modality_tensor_specs

    schema = Schema([*modality_tensor_specs(data.spec), TensorSpec(np.dtype("int64"), (-1,), "label")])
    with warnings.catch_warnings():  # the local-file source is registered twice in MLflow; either fits
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(cfg.data.prepared_dir).resolve()))
    sizes = "-".join(f"{name}{len(split)}" for name, split in sorted(data.splits.items()))
    # MetaDataset's profile is a property MLflow provides; its stubs leave it abstract
    ds = MetaDataset(  # type: ignore[abstract]
        source, name=f"{cfg.data.name}-{sizes}", digest=digest[:36], schema=schema)
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])


class RunTracker:
    """One MLflow run, driven through :class:`mlflow.MlflowClient` with an explicit run id.

    No fluent "active run" is kept open, so nothing is left for MLflow's exit
    handler to retry against a server that went away. Every call is safe after
    the server is gone: what fails is queued, the server is probed again at
    most every ``probe_every`` seconds, and the queue is replayed in order
    (original steps and timestamps) once it answers, at the latest in
    :meth:`close`. What is still queued then is reported; the local files hold
    it all anyway.
    """

    def __init__(self, cfg: Config, run_name: str | None = None, probe_every: float = 30.0,
                 uri: str | None = None, run_id: str | None = None, tags: dict[str, str] | None = None,
                 data: DataModule | None = None) -> None:
        """Open a new run (the settings that apply logged flat, tags set, ``data`` logged as its input), or
        attach to ``run_id`` to log more into it.

        ``uri`` overrides :func:`tracking_uri` (a pipeline passes its own).
        """
        from mlflow import MlflowClient

        self.cfg = cfg
        self.uri = uri or tracking_uri(cfg)
        apply_http_limits(cfg)
        self.spent = 0.0  # seconds waited on the server
        self.out_of_time = False
        self._warned_slow = False
        self.errors: list[str] = []  # what failed for good
        self.replayed: list[str] = []  # what failed while the server was away and was logged once it came back
        self.model_uri: str | None = None
        self.lost = False
        self.probe_every = probe_every
        self._last_probe = 0.0
        self._pending: list[tuple[str, Callable[[], Any]]] = []
        check_reachable(self.uri)
        self.client = MlflowClient(self.uri)
        if run_id is not None:
            self.run_id = run_id
            return
        try:
            self._open(cfg, run_name, tags, data)
        except TrackingUnavailable:
            raise
        except Exception as exc:  # /health answers, the API does not: say so before any training
            raise TrackingUnavailable(
                f"tracking server {self.uri} answers, but opening a run failed ({_one_line(exc)}); fix the "
                "server, or run with --set tracking.enabled=false") from None

    def _open(self, cfg: Config, run_name: str | None, tags: dict[str, str] | None,
              data: DataModule | None) -> None:
        from mlflow.entities import Param

        data_id = data_hash(cfg)
        all_tags = {"algorithm": cfg.algorithm.name, "data_hash": data_id,
                    "config_fingerprint": cfg.fingerprint(), **(tags or {})}
        commit = git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
            all_tags["git_commit"] = commit
        experiment_id = _experiment_id(self.client, cfg.tracking.experiment, cfg.tracking.registered_model)
        run = self.client.create_run(experiment_id, run_name=run_name or f"{cfg.algorithm.name}-seed{cfg.seed}",
                                     tags=all_tags)
        self.run_id = run.info.run_id
        self.spent = 0.0  # opening the run is not part of the budget: a run that cannot open stops here
        params = [Param(k, str(v)[:500]) for k, v in cfg.applicable().items()]
        self._safe("params", lambda: self.client.log_batch(self.run_id, params=params))
        if data is not None:
            self.log_dataset(data, data_id)

    # -- the safety net -------------------------------------------------------
    def _reachable(self) -> bool:
        self._last_probe = time.monotonic()
        try:
            check_reachable(self.uri, timeout=2.0)
        except TrackingUnavailable:
            return False
        return True

    def _spend(self, seconds: float) -> None:
        """Account for time waited on the server: one warning when it is slow, and past
        ``tracking.time_budget`` nothing more is sent."""
        self.spent += seconds
        budget = self.cfg.tracking.time_budget
        if seconds >= SLOW_CALL_SECONDS and not self._warned_slow:
            self._warned_slow = True
            log.warning("the tracking server %s is slow (one call took %.0f s); fedcmi waits on it %g s in all "
                        "(tracking.time_budget), then reports what it did not send", self.uri, seconds, budget)
        if self.spent > budget and not self.out_of_time:
            self.out_of_time = True
            log.warning("tracking.time_budget (%g s) is spent; nothing more goes to %s in this run, and what is "
                        "not sent is reported at the end (the local files keep everything)", budget, self.uri)

    def _call(self, fn: Callable[[], Any]) -> Any:
        t0 = time.monotonic()
        try:
            return fn()
        finally:
            self._spend(time.monotonic() - t0)

    def _flush(self) -> None:
        """Replay queued calls in order; stop (and stay lost) at the first that fails again."""
        while self._pending and not self.out_of_time:
            what, fn = self._pending[0]
            try:
                self._call(fn)
            except Exception as exc:
                if not transient(exc):  # refused for good now that the server answers: report, go on
                    self.errors.append(f"{what}: {_one_line(exc)}")
                    self._pending.pop(0)
                    continue
                self.lost = True
                return
            self._pending.pop(0)
            self.replayed.append(what)
        self.lost = bool(self._pending)

    def _safe(self, what: str, fn: Callable[[], Any]) -> Any:
        if self.out_of_time:
            self._pending.append((what, fn))
            return None
        if self.lost:  # do not spend the client's retries on every call while the server is away
            if time.monotonic() - self._last_probe >= self.probe_every and self._reachable():
                self._flush()
            if self.lost:
                self._pending.append((what, fn))
                return None
        try:
            return self._call(fn)
        except Exception as exc:  # the server may be gone or failing; training must not stop
            msg = f"{what}: {_one_line(exc)}"
            if transient(exc):  # sent again once the server answers, whatever the kind of failure
                log.warning("tracking failed (%s); it is sent again once the server answers", msg)
                self.lost = True
                self._last_probe = time.monotonic()
                self._pending.append((what, fn))
            else:  # the server refused the request itself: sending it again would not help
                log.warning("tracking refused (%s); the local files keep everything", msg)
                self.errors.append(msg)
            return None

    @property
    def unlogged(self) -> list[str]:
        """What the tracking server has not received (yet)."""
        return [what for what, _ in self._pending]

    # -- what a run logs ----------------------------------------------------------
    def log_round(self, rec: dict) -> None:
        step = int(rec["round"])
        self.log_metrics(round_metrics(rec, self.cfg.algorithm.name), step=step, what=f"round {step} metrics")

    def log_metrics(self, metrics: dict[str, float], step: int = 0, what: str = "metrics") -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)  # taken now, so a replay keeps the time the figure was made
        batch = [Metric(k, float(v), ts, step) for k, v in metrics.items()]
        self._safe(what, lambda: self.client.log_batch(self.run_id, metrics=batch))

    def log_outcome(self, files: list[Path], model: ModelPackage) -> list[str]:
        """What a finished training leaves: its files (and the partition with its stats) and its model; then
        the run ends. Returns what was not logged. The final figures are the last round's, already logged."""
        stats = self.cfg.partition.file.with_name("partition_stats.json")
        self.log_artifacts([*files, stats, self.cfg.partition.file])
        self.log_model(model)
        return self.close()

    def log_dataset(self, data: DataModule, data_id: str) -> None:
        """The prepared data as the run's training input, named by ``data_id`` (the run's tag ``data_hash``)."""
        self._safe("dataset", lambda: self.client.log_inputs(
            self.run_id, datasets=[dataset_input(self.cfg, data, data_id)]))

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).exists():
                self._safe(f"artifact {p}", self._artifact_logger(Path(p), artifact_path))

    def _artifact_logger(self, path: Path, artifact_path: str | None) -> Callable[[], Any]:
        return lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_model(self, model: ModelPackage) -> str | None:
        """Log the model; its URI is in :attr:`model_uri` once logged (after a replay too)."""

        def log() -> str:
            import mlflow

            mlflow.set_tracking_uri(self.uri)
            # The model API logs to the fluent active run; open it for this call alone.
            with mlflow.start_run(run_id=self.run_id):
                self.model_uri = model.log()
            return self.model_uri

        return self._safe("model", log)

    def close(self) -> list[str]:
        """End the run (FINISHED, or FAILED if anything was not logged); returns what was not logged."""
        reachable = self._reachable() if self._pending and not self.out_of_time else None
        if reachable:
            self._flush()
        if self._pending:
            why = (f"tracking.time_budget ({self.cfg.tracking.time_budget:g} s) was spent" if self.out_of_time
                   else "the tracking server is still unreachable" if reachable is False
                   else "the tracking server still fails")
            self.errors.append(f"{why}; not logged: {', '.join(self.unlogged)}")
            if self.out_of_time:
                with contextlib.suppress(Exception):  # one last short call, so the run is not left RUNNING
                    self.client.set_terminated(self.run_id, "FAILED")
            return self.errors
        status = "FINISHED" if not self.errors else "FAILED"
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as exc:
            self.errors.append(f"end run: {exc.__class__.__name__}")
        return self.errors


EXPERIMENT_KIND = "custom_model_development"  # MLflow 3's "model training" view, not the GenAI one


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


def register_model(cfg: Config, run_id: str, model_uri: str, headline: float, data_id: str) -> dict:
    """Register a new version with alias ``candidate``; move ``champion`` only if it beats the champion.

    Versions carry their headline metric and the hash of the test data it was
    measured on. A champion measured on other data is never compared by its
    stored figure: it stays, and the reason says so.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from fedcmi.errors import CommandError

    apply_http_limits(cfg)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    check_reachable(tracking_uri(cfg))
    client = MlflowClient()
    name = cfg.tracking.registered_model
    metric = cfg.tracking.headline_metric
    try:
        client.get_run(run_id)
    except MlflowException:
        raise CommandError(f"run {run_id} (from mlflow_run.json) is not on {tracking_uri(cfg)}; nothing was "
                           "registered. Rerun `fedcmi train` against this tracking server") from None
    if model_uri.startswith("models:/m-"):
        try:
            logged = client.get_logged_model(model_uri[len("models:/"):])
        except MlflowException:
            raise CommandError(f"the model {model_uri} is not on {tracking_uri(cfg)}; nothing was registered") \
                from None
        if logged.source_run_id != run_id:
            raise CommandError(f"the model {model_uri} was logged by run {logged.source_run_id}, not {run_id}; "
                               "nothing was registered")
    tags = {metric: str(headline), "data_hash": data_id, "run_id": run_id}
    # one version per training run: a rerun (or a registration cut short) finishes that version
    mine = [v for v in _versions(client, name) if v.tags.get("run_id") == run_id]
    if mine:
        version = min(mine, key=lambda v: int(v.version)).version
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
    else:
        version = mlflow.register_model(model_uri, name, tags=tags).version  # tagged as it is created
    client.set_registered_model_alias(name, "candidate", version)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    promoted, reason = False, ""
    if champ is not None and str(champ.version) == str(version):
        promoted, reason = True, f"v{version} is already the champion"
    elif champ is None:
        promoted, reason = True, "no champion yet"
    else:
        same_data = champ.tags.get("data_hash") == data_id
        champ_score = float(champ.tags.get(metric, "nan"))
        if not same_data:
            reason = (f"champion v{champ.version} was measured on other test data; kept "
                      "(compare it with `fedcmi evaluate`)")
        elif headline > champ_score:
            promoted, reason = True, f"{metric} {headline:.4f} > champion v{champ.version}'s {champ_score:.4f}"
        else:
            reason = f"{metric} {headline:.4f} <= champion v{champ.version}'s {champ_score:.4f}"
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    return {"name": name, "version": int(version), "candidate": int(version), "promoted": promoted, "reason": reason,
            "champion": int(version) if promoted else int(champ.version) if champ else None}


def _versions(client: Any, name: str) -> list[Any]:
    """Every version of registered model ``name`` (none when it does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions("name = '{}'".format(name.replace("'", "\\'"))))
    except MlflowException:
        return []


def log_to_run(cfg: Config, run_info: Path, metrics: dict[str, float], artifacts: list[Path]) -> list[str]:
    """Add metrics and artifacts to a finished training run, keeping its status; returns the errors (never raises)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    info = read_run_info(run_info)
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
        errors.append(f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return errors


def write_run_info(path: Path, info: dict) -> None:
    from fedcmi.io import write_json

    write_json(path, info)


def read_run_info(path: Path) -> dict:
    """``mlflow_run.json``, checked: a damaged one is one :class:`~fedcmi.io.JsonFileError` naming it."""
    from fedcmi.io import JsonFileError, read_json

    info = read_json(path, expect=dict)
    bad = [k for k in ("run_id", "model_uri", "tracking_uri", "experiment")
           if info.get(k) is not None and not isinstance(info[k], str)]
    if bad or (info.get("run_id") is not None and not str(info["run_id"]).isalnum()):
        raise JsonFileError(f"{path} is damaged ({', '.join(bad) or 'run_id'} is not what `fedcmi train` writes); "
                            "rerun `fedcmi train`")
    return info


def reopen_run(info_file: Path, uri: str) -> str | None:
    """The run recorded in ``info_file`` (an ``mlflow_run.json``), set RUNNING again, when it was made on
    ``uri`` and is still there; None otherwise (no record, another server, a deleted run)."""
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


def continued_run(cfg: Config, out_dir: Path, fingerprint: str | None) -> str | None:
    """The MLflow run a ``fedcmi train`` in ``out_dir`` continues, reopened: the run of the checkpoint it
    resumes (same settings and data, same tracking URI, the run still there), so a training keeps one run
    and unbroken curves however often it is restarted. None for a new training."""
    state_file = Path(out_dir) / "checkpoints" / "state.json"
    if fingerprint is None or not state_file.is_file():
        return None
    apply_http_limits(cfg)
    try:
        state = json.loads(state_file.read_text())
    except (ValueError, OSError):
        return None
    if not isinstance(state, dict) or state.get("fingerprint") != fingerprint:
        return None
    return reopen_run(Path(out_dir) / "mlflow_run.json", tracking_uri(cfg))


# -- a federation that several processes (pipeline steps) log into ------------------------------------
RUN_INFO = "mlflow_run.json"


def open_federation_run(cfg: Config, store: Path, uri: str, run_name: str, tags: dict[str, str]) -> str:
    """The MLflow run of the federation kept in ``store``: reopened (RUNNING again) when an earlier run of
    the pipeline opened it, else created; its id is kept in the store so every later step and run finds it."""
    from fedcmi.io import write_json

    info_file = Path(store) / RUN_INFO
    run_id = reopen_run(info_file, uri)
    if run_id is not None:
        return run_id
    from fedcmi.data import DataModule

    tracker = RunTracker(cfg, run_name=run_name, uri=uri, tags=tags, data=DataModule(cfg.data.prepared_dir))
    write_json(info_file, {"run_id": tracker.run_id, "tracking_uri": uri, "experiment": cfg.tracking.experiment})
    if tracker.errors:
        raise TrackingUnavailable(f"the run's parameters could not be logged to {uri}: {tracker.errors[0]}")
    return tracker.run_id


def finish_federation_run(cfg: Config, store: Path, uri: str, run_id: str, model_file: Path,
                          final: dict[str, float]) -> dict:
    """Log the final metrics, files and model of a complete federation, register the model and end the run
    FINISHED; done once per federation (the registration is kept in the store, so a retry registers nothing
    twice). Returns the registration."""
    from fedcmi.data import DataModule
    from fedcmi.io import load_state, read_json, write_json
    from fedcmi.serving import ModelPackage

    reg_file = Path(store) / "register.json"
    if reg_file.is_file():
        return read_json(reg_file)
    tracker = RunTracker(cfg, uri=uri, run_id=run_id)
    package = ModelPackage.of(cfg, load_state(model_file)[0], DataModule(cfg.data.prepared_dir))
    errors = tracker.log_outcome([Path(store) / "history.json", Path(store) / "metrics.json"], package)
    if tracker.model_uri is None:
        raise TrackingUnavailable(f"the final model could not be logged to {uri}: {errors}")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    result = register_model(cfg, run_id, tracker.model_uri, float(final[cfg.tracking.headline_metric]),
                            data_hash(cfg, verify=True))
    write_json(reg_file, result)
    return result


def fail_run(uri: str, run_id: str, reason: str) -> None:
    """End ``run_id`` FAILED with the reason as a tag (a pipeline's exit handler)."""
    from mlflow import MlflowClient

    check_reachable(uri)
    client = MlflowClient(uri)
    client.set_tag(run_id, "last_failed_run", reason[:4000])  # kept when a later run finishes the federation
    client.set_terminated(run_id, "FAILED")
