"""`fedcmi compare`: the protocol's pieces, and the command as a new user runs it on a bring-your-own npz
dataset with a validation split: report, MLflow parent and children, a rerun after kill -9 that skips the
finished trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from faults import ROOT

from fedcmi.compare import Method, Plan, next_lr, paired, select_lr
from fedcmi.errors import CommandError


def test_a_method_is_an_algorithm_or_a_label_with_settings():
    assert Method.parse("fedavg") == Method("fedavg", ("algorithm.name=fedavg",))
    assert Method.parse("FedProx 0.1:algorithm.name=fedprox, algorithm.mu=0.1") == Method(
        "FedProx 0.1", ("algorithm.name=fedprox", "algorithm.mu=0.1"))
    with pytest.raises(CommandError, match="give NAME or LABEL:key=value"):
        Method.parse("broken:algorithm.name")


def test_the_grid_grows_past_a_winning_edge_and_ties_go_to_the_smaller_lr():
    assert select_lr({0.01: 0.5, 0.02: 0.7, 0.05: 0.7}) == 0.02
    assert next_lr([0.01, 0.02, 0.05], 0.05) == 0.1 and next_lr([0.01, 0.02, 0.05], 0.01) == 0.005
    assert next_lr([0.01, 0.02, 0.05], 0.02) is None


def test_paired_differences_have_a_t_interval():
    d = paired([0.1, 0.2, 0.3])
    assert d["mean"] == pytest.approx(0.2) and d["std"] == pytest.approx(0.1)
    assert d["high"] - d["mean"] == pytest.approx(4.302653 * 0.1 / np.sqrt(3), rel=1e-5)
    assert d["ahead"] == 3 and d["n"] == 3


def test_a_plan_that_cannot_be_compared_is_refused_naming_the_option():
    methods = [Method.parse("fedavg"), Method.parse("fedcmi")]
    with pytest.raises(CommandError, match="--baseline 'scaffold' is not among the methods"):
        Plan(methods, "scaffold", [0.1], [0, 1], [0]).check()
    with pytest.raises(CommandError, match=r"--select-seeds \[5\] must be among --seeds"):
        Plan(methods, "fedavg", [0.1], [0, 1], [5]).check()
    with pytest.raises(CommandError, match="at least two --seeds"):
        Plan(methods, "fedavg", [0.1], [0], [0]).check()


def _npz_project(root: Path, val: bool = True) -> Path:
    """A user's own data: train/val/test npz with two modalities, and a params file pointing at it."""
    rng = np.random.default_rng(0)
    raw = root / "mydata"
    raw.mkdir(parents=True)
    for split, n in (("train", 120), ("val", 40), ("test", 60)) if val else (("train", 120), ("test", 60)):
        y = np.arange(n) % 3
        np.savez(raw / f"{split}.npz", label=y.astype(np.int64),
                 sound=(rng.standard_normal((n, 6)) + y[:, None]).astype(np.float32),
                 image=(rng.standard_normal((n, 1, 4, 4)) + 0.3 * y[:, None, None, None]).astype(np.float32))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["data"].update({"name": "npz", "path": str(raw), "modalities": ["sound", "image"]})
    params["model"].update({"encoders": {"sound": "mlp", "image": "cnn"}, "embed_dim": 8, "width": 4})
    params["partition"].update({"num_clients": 4, "min_samples": 4})
    params["federation"].update({"rounds": 2, "clients_per_round": 2, "batch_size": 16})
    params["evaluation"]["linear_probe"] = False
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def _compare(root: Path, *extra: str, popen: bool = False):
    cmd = [sys.executable, "-m", "fedcmi.cli", "compare", "--method", "fedavg", "--method", "fedcmi",
           "--lrs", "0.05", "0.1", "--seeds", "0", "1", "--select-seeds", "0", "--max-extensions", "1",
           "--jobs", "1", *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db"}
    if popen:
        return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_compare_on_your_own_npz_gives_a_report_and_mlflow_runs_and_resumes_after_kill_9(tmp_path):
    from mlflow import MlflowClient

    root = _npz_project(tmp_path)
    # killed (-9) once the first trial has landed: a rerun takes that trial from its file, never trains it again
    proc = _compare(root, popen=True)
    trials = root / "outputs" / "compare" / "trials"
    for _ in range(600):
        if trials.is_dir() and any(trials.glob("*.json")):
            break
        assert proc.poll() is None, proc.stderr.read()[-2000:] if proc.stderr else ""
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p.name: p.stat().st_mtime_ns for p in trials.glob("*.json")}
    assert first
    r = _compare(root)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"({len(first)} already done)" in r.stderr
    assert all(trials.joinpath(n).stat().st_mtime_ns == t for n, t in first.items())  # not trained again
    answer = json.loads(r.stdout)
    report = root / "outputs" / "compare" / "report"
    md = (report / "report.md").read_text()
    assert "| fedcmi |" in md and "Δ vs fedavg (paired) [95% CI]" in md and "Data card: protocol custom" in md
    page = (report / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 3 and "<table>" in page
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["methods"]) == {"fedavg", "fedcmi"}
    for m in summary["methods"].values():  # chosen on validation (ties: the smaller lr), every seed at it
        best = max(sorted(m["val_scores"], key=float), key=lambda k: m["val_scores"][k])
        assert f"{m['chosen_lr']:g}" == best and len(m["test"]) == 2
    # MLflow: one parent, one child per trial, the report among the parent's artifacts
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    parent = client.get_run(answer["mlflow_parent_run"])
    assert parent.info.status == "FINISHED" and parent.data.tags["fedcmi.kind"] == "comparison"
    children = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == len(list(trials.glob("*.json")))
    assert {c.data.params["method"] for c in children} == {"fedavg", "fedcmi"}
    assert all("val_mm_acc" in c.data.metrics and "test_mm_acc" in c.data.metrics for c in children)
    arts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/report.html", "report/summary.json"} <= arts
    # a second rerun: nothing trained, no child logged twice
    again = _compare(root)
    assert again.returncode == 0 and "(0 already done)" not in again.stderr
    assert len(client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent.info.run_id}'")) == len(children)


@pytest.mark.slow
def test_compare_without_a_validation_split_says_how_to_get_one(tmp_path):
    root = _npz_project(tmp_path, val=False)
    r = _compare(root, "--set", "tracking.enabled=false")
    assert r.returncode != 0
    assert "chooses each method's learning rate on the validation split" in r.stderr and "val.npz" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
