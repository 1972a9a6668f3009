"""The component functions and the factory that binds them to the image.

No `from __future__ import annotations` here: KFP reads the real annotation objects.

Each function is a thin call into :mod:`fedcmi.segments` and :mod:`fedcmi.tracking`;
KFP ships a function's source alone, so each imports what it needs inside its body.
They run in the project's image, which carries fedcmi and kfp: nothing is installed
when a pod starts (``install_kfp_package=False``). Every step works in the project
root on the data volume (``data_root``), so the config's relative paths and the
data hash resolve exactly as under ``dvc repro``.
"""

from types import SimpleNamespace
from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, ClassificationMetrics, Input, Metrics, Model, Output


def begin_run(
    params_json: str,
    seed: int,
    algorithm: str,
    lr: float,
    mu: float,
    rounds: int,
    local_epochs: int,
    data_root: str,
    store: str,
    tracking_uri: str,
    run_name: str,
    global_model: Output[Model],
) -> NamedTuple("Begin", [("config_json", str), ("store", str), ("start_round", int), ("run_id", str)]):
    """Resolve the run's settings, continue the federation in ``store`` (or start it), open or reopen
    its MLflow run, and hand the global model to the first round."""
    import json
    import os
    from collections import namedtuple
    from pathlib import Path

    from fedcmi.config import config_with_settings
    from fedcmi.segments import begin, check_within, resolve_store

    os.chdir(data_root)
    cfg = config_with_settings(params_json, {"seed": seed, "algorithm": algorithm, "lr": lr, "mu": mu,
                                             "rounds": rounds, "local_epochs": local_epochs})
    check_within(cfg)  # a pipeline reads only what its data volume holds
    where = resolve_store(store, run_name)
    start = begin(cfg, where, Path(global_model.path))
    run_id = ""
    if tracking_uri:
        from fedcmi.tracking import open_federation_run

        run_id = open_federation_run(cfg, where, tracking_uri, run_name, {"runner": "kubeflow"})
    print(f"[fedcmi] federation {run_name}: {start} of {cfg.federation.rounds} rounds committed in {where}")
    out = namedtuple("Begin", ["config_json", "store", "start_round", "run_id"])
    return out(json.dumps(cfg.to_dict(), sort_keys=True), str(where), start, run_id)


def train_clients(
    config_json: str,
    data_root: str,
    global_model: Input[Model],
    start_round: int,
    offset: int,
    worker: int,
    per_worker: int,
    updates: Output[Artifact],
):
    """Train this worker's clients of round ``start_round + offset`` (nothing past the last round)."""
    import os
    from pathlib import Path

    from fedcmi.config import config_with_settings
    from fedcmi.segments import train_worker

    os.chdir(data_root)
    cfg = config_with_settings(config_json, {})
    train_worker(cfg, Path(global_model.path), start_round + offset, worker, per_worker, Path(updates.path),
                 progress=lambda line: print(f"[fedcmi] {line}"))


def conclude_round(
    config_json: str,
    data_root: str,
    store: str,
    global_model: Input[Model],
    updates: Input[List[Artifact]],
    start_round: int,
    offset: int,
    tracking_uri: str,
    run_id: str,
    new_global: Output[Model],
):
    """Aggregate the round, evaluate it when scheduled, commit it to the store, log its record."""
    import os
    from pathlib import Path

    from fedcmi.config import config_with_settings
    from fedcmi.segments import conclude

    os.chdir(data_root)
    cfg = config_with_settings(config_json, {})
    tracker = None
    if tracking_uri and run_id:
        from fedcmi.tracking import RunTracker

        tracker = RunTracker(cfg, uri=tracking_uri, run_id=run_id)
    rnd = start_round + offset
    rec = conclude(cfg, Path(store), Path(global_model.path), [Path(u.path) for u in updates], rnd,
                   Path(new_global.path), on_round=tracker.log_round if tracker else None)
    if rec is not None:
        acc = f", accuracy {rec['mm_acc']:.4f}" if "mm_acc" in rec else ""
        print(f"[fedcmi] round {rnd + 1}/{cfg.federation.rounds}: accepted {rec['accepted']}, "
              f"rejected {sorted(rec['rejected'])}{acc}")
    if tracker is not None:
        for e in tracker.errors + tracker.unlogged:
            print(f"warning: tracking: {e}; the round is committed in {store}")


def finish_run(
    config_json: str,
    data_root: str,
    store: str,
    global_model: Input[Model],
    tracking_uri: str,
    run_id: str,
    model: Output[Model],
    metrics: Output[Metrics],
    confusion: Output[ClassificationMetrics],
) -> str:
    """Once every round is committed: the final model, its metrics and confusion matrix, and (with
    tracking) the model logged, registered and the MLflow run ended. Returns the federation's status."""
    import json
    import os
    from pathlib import Path

    from fedcmi.config import config_with_settings
    from fedcmi.io import load_state, save_state
    from fedcmi.segments import finish, status

    os.chdir(data_root)
    cfg = config_with_settings(config_json, {})
    final = finish(cfg, Path(store), Path(model.path))
    info = status(cfg, Path(store))
    if final is None:  # rounds remain: the next run continues; this one hands on its last model
        save_state(model.path, *load_state(global_model.path))
        print(f"[fedcmi] {info['completed_rounds']} of {info['rounds']} rounds committed; submit the next run to go on")
        return json.dumps(info)
    for k, v in final["metrics"].items():
        metrics.log_metric(k, float(v))
    confusion.log_confusion_matrix(final["class_names"] or [str(i) for i in range(len(final["confusion"]))],
                                   final["confusion"])
    if tracking_uri and run_id:
        from fedcmi.tracking import finish_federation_run

        info["registered"] = finish_federation_run(cfg, Path(store), tracking_uri, run_id, Path(model.path),
                                                   final["metrics"])
    print(f"[fedcmi] federation complete: {cfg.federation.rounds} rounds, accuracy {final['metrics']['mm_acc']:.4f}")
    return json.dumps(info)


def close_run(status: dsl.PipelineTaskFinalStatus, data_root: str, store: str, run_name: str):
    """The exit handler: a run that did not succeed ends the federation's MLflow run FAILED (never left
    RUNNING); the run is found through the store, as every step finds it."""
    if status.state == "SUCCEEDED":
        return
    import os

    from fedcmi.segments import resolve_store
    from fedcmi.tracking import RUN_INFO, fail_run, read_run_info

    os.chdir(data_root)
    info_file = resolve_store(store, run_name) / RUN_INFO
    if not info_file.is_file():
        print(f"[fedcmi] run ended {status.state}; no MLflow run was opened")
        return
    info = read_run_info(info_file)
    fail_run(info["tracking_uri"], info["run_id"],
             f"Kubeflow run {status.pipeline_job_resource_name} ended {status.state}: {status.error_message}")
    print(f"[fedcmi] run ended {status.state}; MLflow run {info['run_id']} marked FAILED")


def make_components(image: str) -> SimpleNamespace:
    """The components, bound to the project's container ``image`` (which carries kfp)."""

    def c(fn):
        return dsl.component(fn, base_image=image, install_kfp_package=False)

    return SimpleNamespace(begin_run=c(begin_run), train_clients=c(train_clients),
                           conclude_round=c(conclude_round), finish_run=c(finish_run), close_run=c(close_run))
