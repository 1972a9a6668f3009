"""MLflow tracking and the model registry.

One MLflow run per training run. Logging never stops training: if the server
goes away mid-run, the error is kept, training goes on, every metric still
lands in the local files, and :meth:`RunTracker.close` reports what failed.
An unreachable server is reported *before* training starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedcmi.config import Config

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


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def data_hash(cfg: Config) -> str:
    """DVC's hash of the prepared data when ``dvc.lock`` has it, else a hash of its meta file."""
    lock = Path("dvc.lock")
    if lock.is_file():
        import yaml

        stages = (yaml.safe_load(lock.read_text()) or {}).get("stages", {})
        for out in stages.get("prepare", {}).get("outs", []):
            if Path(out.get("path", "")) == Path(cfg.data.prepared_dir) and out.get("md5"):
                return f"dvc:{out['md5']}"
    meta = Path(cfg.data.prepared_dir) / "meta.json"
    return "meta:" + hashlib.sha256(meta.read_bytes()).hexdigest()[:16] if meta.is_file() else "unknown"


class Predictor(nn.Module):
    """The logged MLflow model: a batch dict holding one or both modalities -> class logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.modalities = tuple(net.modalities)  # type: ignore[arg-type]

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = {m: v for m, v in batch.items() if m in self.modalities}
        return self.net(x).mm_logits


class RunTracker:
    """One MLflow run; every call is safe to make after the server is gone."""

    def __init__(self, cfg: Config, run_name: str | None = None) -> None:
        import mlflow

        self.cfg = cfg
        self.mlflow = mlflow
        self.uri = tracking_uri(cfg)
        self.errors: list[str] = []
        self.lost = False
        check_reachable(self.uri)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_experiment(cfg.tracking.experiment)
        self.run = mlflow.start_run(run_name=run_name or f"{cfg.algorithm.name}-seed{cfg.seed}")
        self.run_id = self.run.info.run_id
        self._safe("params", lambda: mlflow.log_params({k: str(v)[:500] for k, v in cfg.flat().items()}))
        tags = {"algorithm": cfg.algorithm.name, "data_hash": data_hash(cfg), "config_fingerprint": cfg.fingerprint()}
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
            tags["git_commit"] = commit
        self._safe("tags", lambda: mlflow.set_tags(tags))

    def _safe(self, what: str, fn) -> Any:
        if self.lost:  # one lost server is enough: do not spend minutes of client retries every round
            self.errors.append(f"{what}: skipped, the tracking server was lost earlier")
            return None
        try:
            return fn()
        except Exception as exc:  # the server may be gone; training must not be
            msg = f"{what}: {exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            self.errors.append(msg)
            log.warning("tracking failed (%s); the local files keep everything", msg)
            try:
                check_reachable(self.uri, timeout=2.0)
            except TrackingUnavailable:
                self.lost = True
            return None

    def log_round(self, rec: dict) -> None:
        step = int(rec["round"])
        metrics = {k: float(v) for k, v in rec.items() if isinstance(v, (int, float)) and k != "round"}
        metrics["rejected_clients"] = float(len(rec.get("rejected", {})))
        self._safe(f"round {step} metrics", lambda: self.mlflow.log_metrics(metrics, step=step))

    def log_final(self, metrics: dict[str, float], prefix: str = "final_") -> None:
        self._safe("final metrics", lambda: self.mlflow.log_metrics({prefix + k: float(v) for k, v in metrics.items()}))

    def log_artifacts(self, paths: list[Path], artifact_path: str | None = None) -> None:
        for p in paths:
            if Path(p).exists():
                self._safe(f"artifact {p}", lambda p=p: self.mlflow.log_artifact(str(p), artifact_path))

    @staticmethod
    def log_model_to_active_run(net: nn.Module) -> str:
        """Log ``net`` as an MLflow model of the active run; returns its URI."""
        import mlflow.pytorch

        # pickle, not pt2: the model takes a dict of modalities, which torch.export cannot trace by example.
        # The fedcmi package travels with the model, so it loads where fedcmi is not installed.
        info = mlflow.pytorch.log_model(
            Predictor(net).eval(), name="model", serialization_format="pickle",
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "safetensors", "pydantic", "pyyaml"],
        )
        return info.model_uri

    def log_model(self, net: nn.Module) -> str | None:
        return self._safe("model", lambda: self.log_model_to_active_run(net))

    def close(self) -> list[str]:
        status = "FINISHED" if not self.errors else "FAILED"
        if self.lost:
            return self.errors
        try:
            self.mlflow.end_run(status=status)
        except Exception as exc:
            self.errors.append(f"end run: {exc.__class__.__name__}")
        return self.errors


def register(cfg: Config, run_id: str, model_uri: str, headline: float, data_id: str) -> dict:
    """Register a new version with alias ``candidate``; move ``champion`` only if it beats the champion.

    Versions carry their headline metric and the hash of the test data it was
    measured on. A champion measured on other data is never compared by its
    stored figure: it stays, and the reason says so.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri(cfg))
    check_reachable(tracking_uri(cfg))
    client = MlflowClient()
    name = cfg.tracking.registered_model
    metric = cfg.tracking.headline_metric
    mv = mlflow.register_model(model_uri, name)
    version = mv.version
    client.set_model_version_tag(name, version, metric, str(headline))
    client.set_model_version_tag(name, version, "data_hash", data_id)
    client.set_model_version_tag(name, version, "run_id", run_id)
    client.set_registered_model_alias(name, "candidate", version)
    try:
        champ = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champ = None
    promoted, reason = False, ""
    if champ is None:
        promoted, reason = True, "no champion yet"
    else:
        same_data = champ.tags.get("data_hash") == data_id
        champ_score = float(champ.tags.get(metric, "nan"))
        if not same_data:
            reason = f"champion v{champ.version} was measured on other test data; kept (compare it with `fedcmi evaluate`)"
        elif headline > champ_score:
            promoted, reason = True, f"{metric} {headline:.4f} > champion v{champ.version}'s {champ_score:.4f}"
        else:
            reason = f"{metric} {headline:.4f} <= champion v{champ.version}'s {champ_score:.4f}"
    if promoted:
        client.set_registered_model_alias(name, "champion", version)
    return {"name": name, "version": int(version), "candidate": int(version), "promoted": promoted, "reason": reason,
            "champion": int(version) if promoted else int(champ.version) if champ else None}


def log_to_run(cfg: Config, run_info: Path, metrics: dict[str, float], artifacts: list[Path]) -> list[str]:
    """Add metrics and artifacts to a finished training run; returns the errors (never raises)."""
    import mlflow

    info = read_run_info(run_info)
    errors: list[str] = []
    try:
        check_reachable(info["tracking_uri"])
        mlflow.set_tracking_uri(info["tracking_uri"])
        with mlflow.start_run(run_id=info["run_id"]):
            mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
            for a in artifacts:
                if Path(a).exists():
                    mlflow.log_artifact(str(a), "evaluation")
    except Exception as exc:
        errors.append(f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return errors


def write_run_info(path: Path, info: dict) -> None:
    from fedcmi.io import write_json

    write_json(path, info)


def read_run_info(path: Path) -> dict:
    return json.loads(Path(path).read_text())
