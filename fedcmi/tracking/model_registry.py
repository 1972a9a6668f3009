"""The model registry: one version per training run, aliases ``candidate`` and ``champion``.

Every registered version gets ``candidate``; ``champion`` moves only when a version beats the champion's
headline figure on the same test data (versions carry the hash of the data they were measured on) and
passes the promotion gate (:mod:`fedcmi.tracking.promotion`): no single-modality path and no
absent-modality figure falls further than its tolerance below the champion's. The decision is the
version's ``promotion`` tag, and the absent-modality sweep it was taken on is an artifact of its run.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.errors import CommandError
from fedcmi.io import load_state, read_json, write_json
from fedcmi.metrics import Evaluation
from fedcmi.outputs import HISTORY, METRICS
from fedcmi.protocols import card_differences, data_card
from fedcmi.serving import ModelPackage
from fedcmi.tracking.inputs import data_hash
from fedcmi.tracking.promotion import REASON_TAG, Decision, decide, sweep_report, tag_figures, version_tags
from fedcmi.tracking.run import RUN_INFO, TrainingRun
from fedcmi.tracking.server import TrackingUnavailable, apply_http_limits, check_reachable, tracking_uri

#: A pipeline's registration of its federation's model, kept in the store.
REGISTRATION = "register.json"


def register_model(cfg: Config, run_id: str, model_uri: str, figures: Mapping[str, float], data_id: str,
                   card: Mapping[str, str] | None = None) -> dict:
    """Register a new version with alias ``candidate``; move ``champion`` only if it passes the gate.

    ``figures``: the candidate's evaluation (flat names), the headline among them. Versions carry the
    headline, the guarded figures and the hash of the test data they were measured on. A champion
    measured on other data, or under another data card (``card``: protocol, classes, split, clients,
    metric), is never compared by its stored figures: it stays, and the reason says so.
    """
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    apply_http_limits(cfg)
    mlflow.set_tracking_uri(tracking_uri(cfg))
    check_reachable(tracking_uri(cfg))
    client = MlflowClient()
    name = cfg.tracking.registered_model
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
    tags = {**version_tags(cfg, figures), "data_hash": data_id, "run_id": run_id}
    if card is not None:
        tags["card"] = json.dumps(dict(card), sort_keys=True)
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
    champion_figures = None
    if champ is not None and str(champ.version) == str(version):
        decision = Decision(True, f"v{version} is already the champion")
    elif champ is None:
        decision = Decision(True, "no champion yet")
    elif champ.tags.get("data_hash") != data_id:
        decision = Decision(False, f"champion v{champ.version} was measured on other test data; kept "
                            "(compare it with `fedcmi evaluate`)")
    elif card is not None and "card" in champ.tags and json.loads(champ.tags["card"]) != dict(card):
        diffs = "; ".join(card_differences(json.loads(champ.tags["card"]), card))
        decision = Decision(False, f"champion v{champ.version} was measured under another data card ({diffs}); "
                            "kept: figures are compared only under the same card")
    else:
        champion_figures = tag_figures(champ.tags)
        decision = decide(cfg, figures, champ.tags, str(champ.version))
    if not (mine and decision.promoted and champ is not None and str(champ.version) == str(version)):
        # the decision taken when the version was registered stays its reason; a rerun only finishes it
        client.set_model_version_tag(name, version, REASON_TAG,
                                     ("promoted: " if decision.promoted else "not promoted: ") + decision.reason)
        with tempfile.TemporaryDirectory(prefix="fedcmi-promotion-") as tmp:
            for f in sweep_report(Path(tmp), str(version), figures, champion_figures, decision):
                client.log_artifact(run_id, str(f), artifact_path="promotion")
    if decision.promoted:
        client.set_registered_model_alias(name, "champion", version)
    return {"name": name, "version": int(version), "candidate": int(version), "promoted": decision.promoted,
            "reason": decision.reason,
            "champion": int(version) if decision.promoted else int(champ.version) if champ else None}


def _versions(client: Any, name: str) -> list[Any]:
    """Every version of registered model ``name`` (none when it does not exist yet)."""
    from mlflow.exceptions import MlflowException

    try:
        return list(client.search_model_versions("name = '{}'".format(name.replace("'", "\\'"))))
    except MlflowException:
        return []


def register_federation(cfg: Config, store: Path, model_file: Path, final: Evaluation) -> dict:
    """Log the files and model of a complete federation kept in ``store`` into its run, end the run, register
    the model; done once per federation (the registration is kept in the store, so a retried step registers
    nothing twice). Returns the registration."""
    reg_file = Path(store) / REGISTRATION
    if reg_file.is_file():
        return read_json(reg_file, expect=dict)
    run = TrainingRun.attach(cfg, Path(store) / RUN_INFO)
    data = DataModule(cfg.data.prepared_dir)
    package = ModelPackage.of(cfg, load_state(model_file, checked=True)[0], data)
    errors = run.finish([Path(store) / HISTORY, Path(store) / METRICS], package)
    if run.model_uri is None:
        raise TrackingUnavailable(f"the final model could not be logged to {run.uri}: {errors}")
    os.environ["MLFLOW_TRACKING_URI"] = run.uri
    result = register_model(cfg, run.run_id, run.model_uri, final.flat(), data_hash(cfg, verify=True),
                            data_card(cfg, data.spec))
    write_json(reg_file, result)
    return result
