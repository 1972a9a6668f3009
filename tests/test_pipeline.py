"""The Kubeflow pipeline: compiled YAML, errors, and a real local run equal to the engine."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, merge
from fedcmi.config import config_from_dict
from fedcmi.federation import sample_clients

ROOT = Path(__file__).resolve().parents[1]


def fedcmi(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedcmi.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)


def test_compiled_yaml_carries_accelerator_parallelism_rounds_and_clients(tmp_path):
    r = fedcmi("pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--parallelism", "3",
               "--accelerator-type", "nvidia.com/gpu", "--accelerator-count", "2", "--retries", "4",
               "--set", "federation.rounds=3", "--set", "federation.clients_per_round=4", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    docs = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    spec = docs[0]
    root_tasks = spec["root"]["dag"]["tasks"]
    rounds = [t for t in root_tasks.values() if t["componentRef"]["name"].startswith("comp-fedcmi-round")]
    assert len(rounds) == 3
    cfg = config_from_dict({"federation": {"rounds": 3, "clients_per_round": 4}})
    for r_index in range(3):
        task = root_tasks["fedcmi-round" if r_index == 0 else f"fedcmi-round-{r_index + 1}"]
        clients = task["inputs"]["parameters"]["clients"]["runtimeValue"]["constant"]
        assert clients == sample_clients(cfg, r_index) and len(clients) == 4
        assert task["inputs"]["parameters"]["round_index"]["runtimeValue"]["constant"] == r_index
    text = (tmp_path / "p.yaml").read_text()
    assert text.count("parallelismLimit: 3") == 3
    resources = [e["container"]["resources"] for e in spec["deploymentSpec"]["executors"].values()
                 if "resources" in e["container"]]
    assert resources and all(res["accelerator"]["resourceType"] == "nvidia.com/gpu" and
                             int(res["accelerator"]["resourceCount"]) == 2 for res in resources)
    assert "maxRetryCount: 4" in text


def test_a_data_volume_is_mounted_on_the_data_step(tmp_path):
    r = fedcmi("pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--pvc", "fedcmi-data",
               "--data-root", "/mnt/fedcmi", "--set", "federation.rounds=1", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    spec, platform = list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    mounts = [m for e in executors.values() for m in e.get("pvcMount", [])]
    assert mounts and mounts[0]["mountPath"] == "/mnt/fedcmi"
    assert "fedcmi-data" in str(mounts[0])
    defaults = spec["root"]["inputDefinitions"]["parameters"]
    assert defaults["source"]["defaultValue"] == "path" and defaults["data_root"]["defaultValue"] == "/mnt/fedcmi"


def test_compile_with_bad_params_is_one_clear_error(tmp_path):
    r = fedcmi("pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--set", "federation.rounds=0", cwd=ROOT)
    assert r.returncode == 2 and "federation.rounds" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_submit_to_an_unreachable_host_is_a_clear_error():
    r = fedcmi("pipeline", "submit", "--host", "http://127.0.0.1:9", "--set", "federation.rounds=1", cwd=ROOT)
    assert r.returncode == 1
    assert "could not submit to Kubeflow Pipelines at http://127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_local_pipeline_run_equals_the_engine_bitwise(tmp_path):
    """kfp.local runs every component in its own process; the final model must match the engine's."""
    from fedcmi.data import DataModule, prepare
    from fedcmi.engine import train
    from fedcmi.io import load_state
    from fedcmi.partition import make_partition, save_partition

    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["algorithm"]["name"] = "fedcmi"
    raw["partition"]["multimodal_fraction"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        cfg = config_from_dict(raw)
        prepare(cfg)
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes),
                       cfg.partition.file)
        engine = train(cfg, progress=False)
    finally:
        os.chdir(cwd)
    store = f"sqlite:///{tmp_path}/pipeline-mlflow.db"
    r = fedcmi("pipeline", "run-local", "--out", "pipe.safetensors", "--tracking-uri", store, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    state, _ = load_state(tmp_path / "pipe.safetensors")
    worst = max(float((state[k].double() - engine.state[k].double()).abs().max()) for k in state)
    assert worst <= 1e-6
    assert all(torch.equal(state[k], engine.state[k]) for k in state), "expected bitwise equality"

    # the pipeline's run holds every round's evaluation, and its final model is registered
    from mlflow import MlflowClient

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.data.tags["runner"] == "kubeflow" and run.data.params["algorithm.name"] == "fedcmi"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "mm_acc")]
    assert sorted(steps) == list(range(1, cfg.federation.rounds + 1))
    final = [m for m in client.get_metric_history(run.info.run_id, "mm_acc") if m.step == cfg.federation.rounds]
    assert final[0].value == engine.history[-1]["mm_acc"]
    champion = client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert champion.run_id == run.info.run_id
