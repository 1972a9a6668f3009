"""The component functions and the factory that binds them to an image.

No `from __future__ import annotations` here: KFP reads the real annotation objects.

KFP lightweight components ship their function's source alone, so every
function imports what it needs inside its body; all logic lives in fedcmi.
"""


from types import SimpleNamespace
from typing import List

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def load_data(
    params_json: str,
    source: str,
    data_root: str,
    dvc_repo: str,
    dvc_rev: str,
    prepared: Output[Dataset],
    partition: Output[Artifact],
):
    """Fetch the DVC-versioned prepared data and partition: from a mounted volume
    (``source='path'``, under ``data_root``) or through ``dvc.api`` (``source='dvc'``)."""
    import json
    import shutil
    from pathlib import Path

    from fedcmi.config import config_from_dict

    cfg = config_from_dict(json.loads(params_json), "params_json")
    if source == "path":
        root = Path(data_root)
        shutil.copytree(root / cfg.data.prepared_dir, prepared.path)
        shutil.copyfile(root / cfg.partition.file, partition.path)
    elif source == "dvc":
        from dvc.api import DVCFileSystem

        fs = DVCFileSystem(dvc_repo, rev=dvc_rev or None)
        fs.get(str(cfg.data.prepared_dir), prepared.path, recursive=True)
        fs.get_file(str(cfg.partition.file), partition.path)
    else:
        raise ValueError(f"source must be 'path' or 'dvc', got {source!r}")


def init_model(params_json: str, prepared: Input[Dataset], partition: Input[Artifact], model: Output[Model]):
    """The seeded initial global model."""
    import json

    from fedcmi.config import config_from_dict
    from fedcmi.steps import init_step

    cfg = config_from_dict(json.loads(params_json), "params_json").with_data_paths(prepared.path, partition.path)
    init_step(cfg, model.path)


def train_client(
    params_json: str,
    prepared: Input[Dataset],
    partition: Input[Artifact],
    global_model: Input[Model],
    client_id: int,
    round_index: int,
    update: Output[Model],
):
    """One client's local training for one round."""
    import json

    from fedcmi.config import config_from_dict
    from fedcmi.steps import client_train_step

    cfg = config_from_dict(json.loads(params_json), "params_json").with_data_paths(prepared.path, partition.path)
    client_train_step(cfg, global_model.path, client_id, round_index, update.path)


def aggregate(
    params_json: str,
    prepared: Input[Dataset],
    partition: Input[Artifact],
    global_model: Input[Model],
    updates: Input[List[Model]],
    round_index: int,
    new_global: Output[Model],
    summary: Output[Artifact],
):
    """Aggregate the round's collected client updates into the next global model."""
    import json

    from fedcmi.config import config_from_dict
    from fedcmi.io import write_json
    from fedcmi.steps import aggregate_step

    cfg = config_from_dict(json.loads(params_json), "params_json").with_data_paths(prepared.path, partition.path)
    _, info = aggregate_step(cfg, global_model.path, [u.path for u in updates],
                             round_index, new_global.path)
    write_json(summary.path, info)


def evaluate(
    params_json: str,
    prepared: Input[Dataset],
    partition: Input[Artifact],
    model: Input[Model],
    round_index: int,
    tracking_uri: str,
    run_id: str,
    metrics: Output[Metrics],
):
    """Evaluate the round's global model; log to the pipeline's MLflow run when one is given."""
    import json

    from fedcmi.config import config_from_dict
    from fedcmi.steps import evaluate_step

    cfg = config_from_dict(json.loads(params_json), "params_json").with_data_paths(prepared.path, partition.path)
    res = evaluate_step(cfg, model.path)
    res.pop("confusion")
    for k, v in res.items():
        metrics.log_metric(k, float(v))
    if tracking_uri and run_id:
        from fedcmi.tracking import RunTracker

        tracker = RunTracker(cfg, uri=tracking_uri, run_id=run_id)
        tracker.log_metrics(res, step=round_index + 1, what=f"round {round_index + 1} metrics")
        for e in tracker.errors + tracker.unlogged:
            print(f"warning: tracking: {e}; the metrics are in this step's Metrics artifact")


def start_run(params_json: str, tracking_uri: str, run_name: str) -> str:
    """Open the pipeline's MLflow run (params logged flat); '' when tracking is off."""
    import json

    if not tracking_uri:
        return ""
    from fedcmi.config import config_from_dict
    from fedcmi.tracking import RunTracker

    cfg = config_from_dict(json.loads(params_json), "params_json")
    return RunTracker(cfg, run_name=run_name, uri=tracking_uri, tags={"runner": "kubeflow"}).run_id


def register_model(
    params_json: str,
    prepared: Input[Dataset],
    partition: Input[Artifact],
    model: Input[Model],
    tracking_uri: str,
    run_id: str,
    result: Output[Artifact],
):
    """Log the final model to the pipeline's MLflow run and register it (candidate / champion)."""
    import json
    import os

    from fedcmi.config import config_from_dict
    from fedcmi.io import write_json

    if not (tracking_uri and run_id):
        write_json(result.path, {"skipped": "no tracking server given"})
        return
    from fedcmi.steps import evaluate_step, load_model
    from fedcmi.tracking import RunTracker, data_hash, register

    cfg = config_from_dict(json.loads(params_json), "params_json").with_data_paths(prepared.path, partition.path)
    net = load_model(cfg, model.path)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_uri
    tracker = RunTracker(cfg, uri=tracking_uri, run_id=run_id)
    tracker.log_model(net)
    errors = tracker.close()
    if tracker.model_uri is None:
        raise RuntimeError(f"the final model could not be logged to {tracking_uri}: {errors}")
    headline = evaluate_step(cfg, model.path)[cfg.tracking.headline_metric]
    write_json(result.path, register(cfg, run_id, tracker.model_uri, float(headline), data_hash(cfg)))


def make_components(image: str) -> SimpleNamespace:
    """The components, bound to the project's container ``image``."""

    def c(fn):
        return dsl.component(fn, base_image=image)

    return SimpleNamespace(
        load_data=c(load_data), init_model=c(init_model), train_client=c(train_client), aggregate=c(aggregate),
        evaluate=c(evaluate), start_run=c(start_run), register_model=c(register_model),
    )
