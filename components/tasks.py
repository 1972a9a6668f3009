"""The component functions and the factory that binds them to the image.

No `from __future__ import annotations` here: KFP reads the real annotation objects.

Each function is a thin call into :mod:`fedcmi.runners.store` and :mod:`fedcmi.tracking`;
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
    expect_committed: int,
    global_model: Output[Model],
) -> NamedTuple("Begin", [("config_json", str), ("store", str), ("committed", int)]):
    """Resolve the run's settings, continue the federation in ``store`` (or start it), open or reopen
    its MLflow run, and hand the global model to the first round. A store holding fewer than
    ``expect_committed`` rounds (what the driver's earlier runs committed) is refused, and every refusal
    that a resubmitted run would meet again is announced on one line the driver reads."""
    import json
    import os
    from collections import namedtuple
    from pathlib import Path

    from fedcmi.config import config_with_settings
    from fedcmi.errors import refusal
    from fedcmi.runners.store import begin, check_within, resolve_store

    os.chdir(data_root)
    try:
        cfg = config_with_settings(params_json, {"seed": seed, "algorithm": algorithm, "lr": lr, "mu": mu,
                                                 "rounds": rounds, "local_epochs": local_epochs})
        check_within(cfg)  # a pipeline reads only what its data volume holds
        where = resolve_store(store, run_name)
        committed = begin(cfg, where, Path(global_model.path), expect=expect_committed)
    except Exception as exc:
        line = refusal(exc)
        if line is not None:
            print(line, flush=True)
        raise
    if tracking_uri:
        from fedcmi.data import DataModule
        from fedcmi.tracking.run import RUN_INFO, TrainingRun
        from fedcmi.tracking.server import TrackingUnavailable

        run = TrainingRun.open(cfg, where / RUN_INFO, uri=tracking_uri, name=run_name, tags={"runner": "kubeflow"},
                               data=DataModule(cfg.data.prepared_dir))
        if run.errors:
            raise TrackingUnavailable(f"the run's parameters could not be logged to {tracking_uri}: {run.errors[0]}")
    print(f"[fedcmi] federation {run_name}: {committed} of {cfg.federation.rounds} rounds committed in {where}")
    out = namedtuple("Begin", ["config_json", "store", "committed"])
    return out(json.dumps(cfg.to_dict(), sort_keys=True), str(where), committed)


def train_clients(
    config_json: str,
    data_root: str,
    global_model: Input[Model],
    committed: int,
    offset: int,
    worker: int,
    per_worker: int,
    updates: Output[Artifact],
):
    """Train this worker's clients of round ``committed + offset + 1`` (nothing past the last round)."""
    import os
    from pathlib import Path

    from fedcmi.config import config_with_settings
    from fedcmi.runners.store import train_worker

    os.chdir(data_root)
    cfg = config_with_settings(config_json, {})
    train_worker(cfg, Path(global_model.path), committed + offset + 1, worker, per_worker, Path(updates.path),
                 progress=lambda line: print(f"[fedcmi] {line}"))


def conclude_round(
    config_json: str,
    data_root: str,
    store: str,
    global_model: Input[Model],
    updates: Input[List[Artifact]],
    committed: int,
    offset: int,
    tracking_uri: str,
    new_global: Output[Model],
    round_metrics: Output[Metrics],
):
    """Close the round: aggregate, evaluate when scheduled, commit it to the store; its figures go to the
    federation's MLflow run and to this step's metrics artifact."""
    import os
    from pathlib import Path

    from fedcmi.config import config_with_settings
    from fedcmi.runners.store import conclude
    from fedcmi_components.sinks import KfpMetrics

    os.chdir(data_root)
    cfg = config_with_settings(config_json, {})
    sinks: list = [KfpMetrics(round_metrics, cfg.algorithm.name)]
    run = None
    if tracking_uri:  # the federation's run, as begin_run opened it, is found through the store
        from fedcmi.tracking.run import RUN_INFO, TrainingRun
        from fedcmi.tracking.sink import MlflowSink

        run = TrainingRun.attach(cfg, Path(store) / RUN_INFO)
        sinks.append(MlflowSink(run))
    round_no = committed + offset + 1
    rec = conclude(cfg, Path(store), Path(global_model.path), [Path(u.path) for u in updates], round_no,
                   Path(new_global.path), sinks=sinks)
    if rec is not None:
        acc = f", accuracy {rec.evaluation.mm_acc:.4f}" if rec.evaluation is not None else ""
        print(f"[fedcmi] round {round_no}/{cfg.federation.rounds}: accepted {rec.participation.accepted}, "
              f"rejected {sorted(rec.participation.rejected)}"
              + (f", late {sorted(rec.participation.late)}" if rec.participation.late else "") + acc)
    if run is not None:
        run.calls.drain()
        for e in run.errors + run.unlogged:
            print(f"warning: tracking: {e}; the round is committed in {store}")


def finish_run(
    config_json: str,
    data_root: str,
    store: str,
    global_model: Input[Model],
    tracking_uri: str,
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
    from fedcmi.data import DataModule
    from fedcmi.io import load_state, save_state
    from fedcmi.runners.store import finish, status
    from fedcmi_components.sinks import KfpMetrics

    os.chdir(data_root)
    cfg = config_with_settings(config_json, {})
    final = finish(cfg, Path(store), Path(model.path), sinks=[KfpMetrics(metrics, cfg.algorithm.name)])
    info = status(cfg, Path(store))
    if final is None:  # rounds remain: the next run continues; this one hands on its last model
        save_state(model.path, *load_state(global_model.path, checked=True))
        print(f"[fedcmi] {info['completed_rounds']} of {info['rounds']} rounds committed; submit the next run to go on")
        return json.dumps(info)
    spec = DataModule(cfg.data.prepared_dir).spec
    confusion.log_confusion_matrix(list(spec.class_names) or [str(i) for i in range(len(final.confusion))],
                                   final.confusion)
    if tracking_uri:
        from fedcmi.tracking.model_registry import register_federation

        reg = info["registered"] = register_federation(cfg, Path(store), Path(model.path), final)
        print(f"[fedcmi] registered v{reg['version']}: {'champion' if reg['promoted'] else 'candidate'} "
              f"({reg['reason']})")
    print(f"[fedcmi] federation complete: {cfg.federation.rounds} rounds, accuracy {final.mm_acc:.4f}")
    return json.dumps(info)


def close_run(status: dsl.PipelineTaskFinalStatus, data_root: str, store: str, run_name: str):
    """The exit handler: a run that did not succeed ends the federation's MLflow run FAILED (never left
    RUNNING); the run is found through the store, as every step finds it."""
    if status.state == "SUCCEEDED":
        return
    import os

    from fedcmi.runners.store import resolve_store
    from fedcmi.tracking.run import RUN_INFO, fail_recorded_run

    os.chdir(data_root)
    run_id = fail_recorded_run(resolve_store(store, run_name) / RUN_INFO,
                               f"Kubeflow run {status.pipeline_job_resource_name} ended {status.state}: "
                               f"{status.error_message}")
    if run_id is None:
        print(f"[fedcmi] run ended {status.state}; no MLflow run was opened")
        return
    print(f"[fedcmi] run ended {status.state}; MLflow run {run_id} marked FAILED")


def make_components(image: str) -> SimpleNamespace:
    """The components, bound to the project's container ``image`` (which carries kfp)."""

    def c(fn):
        return dsl.component(fn, base_image=image, install_kfp_package=False)

    return SimpleNamespace(begin_run=c(begin_run), train_clients=c(train_clients),
                           conclude_round=c(conclude_round), finish_run=c(finish_run), close_run=c(close_run))
