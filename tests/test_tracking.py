"""MLflow tracking against a real `mlflow server` on 127.0.0.1, driven through the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, merge

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp: Path, port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "2",
         "--backend-store-uri", f"sqlite:///{tmp}/server.db", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "w"), start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            with urllib.request.urlopen(uri + "/health", timeout=1) as r:
                if r.status == 200:
                    return proc, uri
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start: " + (tmp / "server.log").read_text()[-2000:])


def stop(proc: subprocess.Popen) -> None:
    with_suppress = os.killpg
    try:
        with_suppress(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def get(uri: str, path: str) -> dict:
    with urllib.request.urlopen(uri + path, timeout=10) as r:
        return json.loads(r.read())


def fedcmi(*args, cwd, uri=None):
    # MLflow's own retries stay on: a busy one-worker server may drop a connection, as a real one can.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
    if uri:
        env["MLFLOW_TRACKING_URI"] = uri
    return subprocess.run([sys.executable, "-m", "fedcmi.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=900)


@pytest.fixture
def project(tmp_path):
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["tracking"] = {**raw["tracking"], "enabled": True, "registered_model": "tiny-model", "experiment": "tiny"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    assert fedcmi("prepare", cwd=tmp_path).returncode == 0
    assert fedcmi("partition", cwd=tmp_path).returncode == 0
    return tmp_path


def test_run_model_and_registry_over_http(project, tmp_path_factory):
    server_dir = tmp_path_factory.mktemp("server")
    proc, uri = start_server(server_dir)
    try:
        r = fedcmi("train", "--set", "algorithm.name=fedcmi", cwd=project, uri=uri)
        assert r.returncode == 0, r.stderr
        info = json.loads((project / "outputs/train/mlflow_run.json").read_text())
        assert info["errors"] == [] and info["model_uri"]
        run = get(uri, f"/api/2.0/mlflow/runs/get?run_id={info['run_id']}")["run"]
        params = {p["key"]: p["value"] for p in run["data"]["params"]}
        assert params["algorithm.name"] == "fedcmi" and params["federation.rounds"] == "2"
        assert params["threads"] == "1" and "algorithm.fedcmi.w_uni" in params
        # only the settings that apply: no other dataset's section, no other algorithm's, no other generator's
        assert not [k for k in params if k.startswith(("data.cremad.", "data.ave.", "data.crisismmd.",
                                                       "algorithm.ogm.", "algorithm.modality"))]
        assert "data.synthetic.weak_noise" in params and "data.synthetic.strong_confusion" not in params
        tags = {t["key"]: t["value"] for t in run["data"]["tags"]}
        assert tags["data_hash"] and tags["algorithm"] == "fedcmi"
        # the prepared data is the run's input, named by the hash the run is tagged with
        inputs = run["inputs"]["dataset_inputs"]
        assert len(inputs) == 1 and inputs[0]["dataset"]["digest"] == tags["data_hash"][:36]
        assert {"key": "mlflow.data.context", "value": "training"} in inputs[0]["tags"]
        # metrics grouped by prefix, the headline once (no final_/test_ copies of the last round)
        latest = {m["key"]: m for m in run["data"]["metrics"]}
        assert {"eval/mm_acc", "eval/uni_acc_visual", "train/loss", "round/seconds", "round/threads",
                "fedcmi/dominant_frac_audio", "eval_per_class/acc_0", "round/rejected_clients"} <= set(latest)
        assert not [k for k in latest if "/" not in k], sorted(latest)
        hist = get(uri, f"/api/2.0/mlflow/metrics/get-history?run_id={info['run_id']}&metric_key=eval/uni_acc_visual")
        assert [m["step"] for m in hist["metrics"]] == [1, 2]
        assert get(uri, f"/api/2.0/mlflow/metrics/get-history?run_id={info['run_id']}"
                        "&metric_key=fedcmi/dominant_frac_audio")["metrics"][0]["step"] == 2
        exp = get(uri, "/api/2.0/mlflow/experiments/get-by-name?experiment_name=tiny")["experiment"]
        exp_tags = {t["key"]: t["value"] for t in exp["tags"]}
        assert exp_tags["mlflow.experimentKind"] == "custom_model_development"
        assert "#/models/tiny-model" in exp_tags["mlflow.note.content"]
        arts = get(uri, f"/api/2.0/mlflow/artifacts/list?run_id={info['run_id']}")
        assert {"history.json", "curves.png", "partition_stats.json"} <= {f["path"] for f in arts["files"]}

        assert fedcmi("evaluate", "--out", "outputs/eval/metrics.json", "--log", cwd=project, uri=uri).returncode == 0
        r = fedcmi("register", cwd=project, uri=uri)
        assert r.returncode == 0, r.stderr
        first = json.loads(r.stdout)
        assert first["promoted"] and first["version"] == 1
        alias = get(uri, "/api/2.0/mlflow/registered-models/alias?name=tiny-model&alias=champion")
        assert alias["model_version"]["version"] == "1"

        # registering the same run again finishes its own version, never adds one
        again = json.loads(fedcmi("register", cwd=project, uri=uri).stdout)
        assert again["version"] == 1 and again["champion"] == 1

        # a worse model of another training run: candidate moves, champion stays
        metrics = json.loads((project / "outputs/eval/metrics.json").read_text())
        worse = {**metrics, "mm_acc": metrics["mm_acc"] - 0.5}
        (project / "worse.json").write_text(json.dumps(worse))
        r = fedcmi("train", "--set", "algorithm.name=fedcmi", "--set", "seed=4", cwd=project, uri=uri)
        assert r.returncode == 0, r.stderr
        r = fedcmi("register", "--metrics", "worse.json", cwd=project, uri=uri)
        second = json.loads(r.stdout)
        assert second["version"] == 2 and not second["promoted"]
        assert f"fedcmi: v2 is the candidate, not the champion: {second['reason']}" in r.stderr
        v2 = get(uri, "/api/2.0/mlflow/model-versions/get?name=tiny-model&version=2")["model_version"]
        v2_tags = {t["key"]: t["value"] for t in v2["tags"]}
        assert v2_tags["promotion"] == "not promoted: " + second["reason"]
        assert {"path_acc_audio", "path_acc_visual", "absent_acc_30", "absent_acc_60"} <= set(v2_tags)
        cand = get(uri, "/api/2.0/mlflow/registered-models/alias?name=tiny-model&alias=candidate")
        champ = get(uri, "/api/2.0/mlflow/registered-models/alias?name=tiny-model&alias=champion")
        assert cand["model_version"]["version"] == "2" and champ["model_version"]["version"] == "1"

        # the registered model loads back as a pyfunc over named modality arrays, with its signature;
        # its torch network also predicts from one modality
        import mlflow.pyfunc
        import numpy as np

        os.environ["MLFLOW_TRACKING_URI"] = uri
        try:
            model = mlflow.pyfunc.load_model("models:/tiny-model@champion")
        finally:
            del os.environ["MLFLOW_TRACKING_URI"]
        assert model.metadata.get_input_schema().input_names() == ["audio", "visual"]
        shapes = {"audio": (1, 8, 8), "visual": (1, 3, 8, 8)}
        both = {m: np.random.default_rng(0).standard_normal((3, *s)).astype(np.float32) for m, s in shapes.items()}
        pred = model.predict(both)
        assert list(pred.columns[:2]) == ["class_index", "class_name"] and len(pred) == 3
        assert np.allclose(pred.filter(like="p_").sum(axis=1), 1.0, atol=1e-5)
        net = model.unwrap_python_model().network
        assert net({m: torch.from_numpy(v) for m, v in both.items()}).shape == (3, 6)
        assert net({"visual": torch.from_numpy(both["visual"])}).shape == (3, 6)
        assert (net({m: torch.from_numpy(v) for m, v in both.items()}).argmax(1).numpy()
                == pred["class_index"].to_numpy()).all()
        alone = {m: model.predict({m: v}) for m, v in both.items()}
        _served_model_answers(uri, "models:/tiny-model@champion", both, pred, alone, tmp_path_factory.mktemp("serve"))

        with urllib.request.urlopen(uri + "/", timeout=10) as page:
            assert page.status == 200 and b"<html" in page.read().lower()
    finally:
        stop(proc)


def _served_model_answers(uri: str, model_uri: str, inputs: dict, expected, alone: dict, tmp: Path) -> None:
    """`mlflow models serve` on loopback answers a REST prediction equal to the loaded model's, with both
    modalities and with either one alone (``alone``: the loaded model's answers), naming the path."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=open(tmp / "serve.log", "w"), env=env, start_new_session=True)
    try:
        for _ in range(240):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                assert proc.poll() is None, (tmp / "serve.log").read_text()[-3000:]
                time.sleep(0.5)
        else:
            raise AssertionError("mlflow models serve did not start: " + (tmp / "serve.log").read_text()[-3000:])
        def ask(request: dict) -> list[dict]:
            body = json.dumps({"inputs": {m: v.tolist() for m, v in request.items()}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["predictions"]

        answer = ask(inputs)
        assert [a["class_index"] for a in answer] == expected["class_index"].tolist()
        assert [a["class_name"] for a in answer] == expected["class_name"].tolist()
        assert {a["path"] for a in answer} == {"mm"}
        for m, table in alone.items():
            answer = ask({m: inputs[m]})
            assert [a["class_index"] for a in answer] == table["class_index"].tolist(), m
            assert {(a["path"], a["path_kind"]) for a in answer} == {(f"path/{m}", "infiltration")}, answer[0]
        try:
            ask({})
        except urllib.error.HTTPError as err:
            assert err.code == 400 and "holds none of the modalities" in err.read().decode()
        else:
            raise AssertionError("an empty request was answered")
    finally:
        stop(proc)


def test_a_resumed_training_continues_its_run_and_a_finished_one_logs_nothing(project):
    """One MLflow run per training: rounds 1-2, then the same training extended to 3 rounds, then a rerun
    with every round done. One run, mm_acc at steps 1, 2, 3, one logged model per training that trained."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/runs.db"
    assert fedcmi("train", cwd=project, uri=uri).returncode == 0
    first = json.loads((project / "outputs/train/mlflow_run.json").read_text())
    r = fedcmi("train", "--set", "federation.rounds=3", cwd=project, uri=uri)
    assert r.returncode == 0, r.stderr
    second = json.loads((project / "outputs/train/mlflow_run.json").read_text())
    assert second["run_id"] == first["run_id"]
    r = fedcmi("train", "--set", "federation.rounds=3", cwd=project, uri=uri)
    assert r.returncode == 0 and "nothing new to log" in r.stdout, r.stderr
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert [x.info.run_id for x in runs] == [first["run_id"]] and runs[0].info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(first["run_id"], "eval/mm_acc")] == [1, 2, 3]
    models = client.search_logged_models([client.get_experiment_by_name("tiny").experiment_id])
    assert len(models) == 2  # rounds 1-2, then round 3; the third call trained nothing and logged nothing
    # starting over (--resume never) is a new training: a new run
    assert fedcmi("train", "--resume", "never", cwd=project, uri=uri).returncode == 0
    assert json.loads((project / "outputs/train/mlflow_run.json").read_text())["run_id"] != first["run_id"]


def test_a_rerun_completes_a_run_that_an_outage_left_with_holes(project):
    """Round three, case 4: rounds that never reached the server (an outage outlasting the budget) are logged
    by the rerun from the checkpoint's history; before, the rerun said 'nothing new to log' and the run
    stayed with holes."""
    import sqlite3

    from mlflow import MlflowClient

    uri = f"sqlite:///{project}/holes.db"
    assert fedcmi("train", cwd=project, uri=uri).returncode == 0
    run_id = json.loads((project / "outputs/train/mlflow_run.json").read_text())["run_id"]
    db = sqlite3.connect(project / "holes.db")  # what the outage kept from the server: rounds after the first
    db.execute("delete from metrics where step >= 2")
    db.commit()
    db.close()
    r = fedcmi("train", cwd=project, uri=uri)
    assert r.returncode == 0, r.stderr
    assert "logged rounds [2] the run lacked" in r.stdout
    client = MlflowClient(uri)
    assert [m.step for m in client.get_metric_history(run_id, "round/seconds")] == [1, 2]
    assert [m.step for m in client.get_metric_history(run_id, "eval/mm_acc")] == [1, 2]
    assert client.get_run(run_id).info.status == "FINISHED"


def test_unreachable_server_fails_before_training(project):
    r = fedcmi("train", cwd=project, uri=f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1
    assert "unreachable" in r.stderr and "Traceback" not in r.stderr
    assert not (project / "outputs" / "train").exists()


def _train_with_server_events(project, uri, events, probe_every=30.0, close_wait=3.0):
    """Train 4 rounds in-process while ``events[round]()`` runs after that round is logged."""
    from fedcmi.config import load_config
    from fedcmi.runners.engine import train
    from fedcmi.tracking.run import RUN_INFO, TrainingRun
    from fedcmi.tracking.sink import MlflowSink

    os.environ.update({"MLFLOW_TRACKING_URI": uri, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    cwd = os.getcwd()
    os.chdir(project)
    try:
        cfg = load_config("params.yaml", ["federation.rounds=4", f"tracking.close_wait={close_wait}"])
        tracker = TrainingRun.open(cfg, project / RUN_INFO, probe_every=probe_every)
        sink = MlflowSink(tracker)

        class LogThen:
            def log_round(self, rec):
                sink.log_round(rec)
                events.get(rec.round, lambda: None)()

            def log_final(self, final, history):
                pass

        res = train(cfg, progress=False, sinks=[LogThen()])
        errors = tracker.close()
    finally:
        os.chdir(cwd)
        for k in ("MLFLOW_TRACKING_URI", "MLFLOW_HTTP_REQUEST_MAX_RETRIES"):
            os.environ.pop(k, None)
    return res, tracker, errors


def test_server_lost_mid_run_for_good_loses_no_local_result_and_leaves_no_open_run(project, tmp_path_factory):
    import mlflow

    proc, uri = start_server(tmp_path_factory.mktemp("server"))
    try:
        res, tracker, errors = _train_with_server_events(project, uri, {1: lambda: stop(proc)})
    finally:
        stop(proc)
    assert [r.round for r in res.history] == [1, 2, 3, 4]
    assert tracker.unlogged == ["round 2 metrics", "round 3 metrics", "round 4 metrics"]
    assert len(errors) == 1 and "still unreachable" in errors[0] and "round 4 metrics" in errors[0]
    # nothing left open for MLflow's exit handler, which would retry against the dead server for minutes
    assert mlflow.active_run() is None
    state = json.loads((project / "outputs/train/checkpoints/state.json").read_text())
    assert state["completed_rounds"] == 4 and len(state["history"]) == 4


def test_server_lost_mid_run_and_back_gets_every_round_replayed(project, tmp_path_factory):
    server_dir = tmp_path_factory.mktemp("server")
    proc, uri = start_server(server_dir)
    port = int(uri.rsplit(":", 1)[1])
    procs = [proc]

    def restart():
        procs.append(start_server(server_dir, port)[0])

    try:
        res, tracker, errors = _train_with_server_events(
            project, uri, {1: lambda: stop(procs[0]), 3: restart}, probe_every=0.0)
        assert errors == [] and tracker.unlogged == []
        assert tracker.replayed == ["round 2 metrics", "round 3 metrics"]
        hist = get(uri, f"/api/2.0/mlflow/metrics/get-history?run_id={tracker.run_id}&metric_key=eval/mm_acc")["metrics"]
        by_step = {m["step"]: m["value"] for m in hist}
        assert sorted(by_step) == [1, 2, 3, 4]
        assert all(by_step[r.round] == pytest.approx(r.evaluation.mm_acc) for r in res.history)
        assert get(uri, f"/api/2.0/mlflow/runs/get?run_id={tracker.run_id}")["run"]["info"]["status"] == "FINISHED"
    finally:
        for p in procs:
            stop(p)
