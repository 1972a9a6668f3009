"""The Kubeflow pipeline: compiled YAML, errors, and a real local run equal to the engine."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, merge

from fedcmi import __version__ as fedcmi_version
from fedcmi.config import config_from_dict

ROOT = Path(__file__).resolve().parents[1]


def fedcmi(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedcmi.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=900)


def compiled(tmp_path, *args):
    r = fedcmi("pipeline", "compile", "--out", str(tmp_path / "p.yaml"), *args, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r, list(yaml.safe_load_all((tmp_path / "p.yaml").read_text()))


def test_the_spec_does_not_grow_with_the_rounds(tmp_path):
    sizes = {}
    for rounds in (20, 180, 1000):
        r, _ = compiled(tmp_path, "--set", f"federation.rounds={rounds}")
        sizes[rounds] = (tmp_path / "p.yaml").stat().st_size
        assert f"{-(-rounds // 10)} run(s) for {rounds} rounds" in r.stdout
    assert max(sizes.values()) < 1 << 20
    assert max(sizes.values()) - min(sizes.values()) < 100  # only the default of the rounds parameter differs


def test_compiled_spec_follows_kfp_conventions(tmp_path):
    _, (spec, *_) = compiled(tmp_path, "--parallelism", "3", "--accelerator-count", "2", "--retries", "4",
                            "--cpu", "6", "--memory", "24Gi", "--rounds-per-run", "3", "--clients-per-pod", "2",
                            "--set", "federation.rounds=7", "--set", "federation.clients_per_round=5")
    text = (tmp_path / "p.yaml").read_text()
    params = spec["root"]["inputDefinitions"]["parameters"]
    assert {"seed", "algorithm", "lr", "mu", "rounds", "local_epochs", "tracking_uri", "store"} <= set(params)
    assert params["rounds"]["defaultValue"] == 7
    executors = spec["deploymentSpec"]["executors"].values()
    assert all("pip install" not in " ".join(e["container"]["command"]) for e in executors)
    assert {e["container"]["image"] for e in executors} == {f"fedcmi:{fedcmi_version}"}
    assert all("resourceCpuRequest" in e["container"]["resources"] for e in executors)
    gpus = [e for e in executors if "accelerator" in e["container"]["resources"]]
    assert len(gpus) == 3 and all(int(e["container"]["resources"]["accelerator"]["resourceCount"]) == 2
                                  and e["container"]["resources"]["resourceMemoryRequest"] == "24Gi" for e in gpus)
    # three round slots, each a ParallelFor over ceil(5 / 2) = 3 training pods, at most 3 at once
    assert "parallelismLimit: 3" in text and "raw: '[0, 1, 2]'" in text
    tasks = [t for c in [spec["root"], *spec["components"].values()] for t in c.get("dag", {}).get("tasks", {}).values()]
    assert tasks and all(t.get("cachingOptions", {}).get("enableCache") is not True for t in tasks)
    retried = [t["taskInfo"]["name"] for t in tasks if t.get("retryPolicy", {}).get("maxRetryCount") == 4]
    assert {"train", "conclude", "begin", "finish"} <= set(retried)
    exit_tasks = [t for t in spec["root"]["dag"]["tasks"].values()
                  if t.get("triggerPolicy", {}).get("strategy") == "ALL_UPSTREAM_TASKS_COMPLETED"]
    assert [t["taskInfo"]["name"] for t in exit_tasks] == ["close-run"]


@pytest.mark.parametrize("flag, value, says", [
    ("--memory", "16GB", "not a Kubernetes memory quantity"),
    ("--cpu", "four", "not a Kubernetes CPU quantity"),
    ("--accelerator-count", "-1", "below 0"),
    ("--rounds-per-run", "0", "below 1"),
    ("--clients-per-pod", "x", "not a whole number"),
])
def test_a_bad_flag_is_one_clear_message_and_exit_2(tmp_path, flag, value, says):
    r = fedcmi("pipeline", "compile", "--out", str(tmp_path / "p.yaml"), flag, value, cwd=ROOT)
    assert r.returncode == 2 and says in r.stderr and flag in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_a_data_volume_is_mounted_on_every_step(tmp_path):
    _, (spec, platform) = compiled(tmp_path, "--pvc", "fedcmi-data", "--data-root", "/mnt/fedcmi",
                                   "--set", "federation.rounds=1")
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(executors) == set(spec["deploymentSpec"]["executors"])
    for e in executors.values():
        assert [(m["mountPath"], m["constant"] if "constant" in m else str(m)) for m in e["pvcMount"]][0][0] \
            == "/mnt/fedcmi" and "fedcmi-data" in str(e["pvcMount"])
    assert spec["root"]["inputDefinitions"]["parameters"]["data_root"]["defaultValue"] == "/mnt/fedcmi"


def test_compile_with_bad_params_is_one_clear_error(tmp_path):
    r = fedcmi("pipeline", "compile", "--out", str(tmp_path / "p.yaml"), "--set", "federation.rounds=0", cwd=ROOT)
    assert r.returncode == 2 and "federation.rounds" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_submit_to_an_unreachable_host_is_a_clear_error():
    r = fedcmi("pipeline", "submit", "--host", "http://127.0.0.1:9", "--set", "federation.rounds=1", cwd=ROOT)
    assert r.returncode == 1
    assert "could not submit to Kubeflow Pipelines at http://127.0.0.1:9" in r.stderr and "Traceback" not in r.stderr


# Faults the pipeline's steps meet in their own processes (kfp.local subprocesses or containers): Python
# imports this sitecustomize from PYTHONPATH at start. A client's training raises in round FAIL_ROUND; the
# conclusion of round LOSE_ROUND raises once (a pod lost after the round's training), failing that run.
SITECUSTOMIZE = """
import os
import fedcmi.federation as fed
import fedcmi.runners.store as seg

FAIL_ROUND, FAIL_CLIENT, LOSE_ROUND = {fail_round}, {fail_client}, {lose_round}
_train, _conclude = fed.Federation.train_client, seg.conclude


def train_client(self, state, cid, rnd):
    if (rnd, cid) == (FAIL_ROUND, FAIL_CLIENT):
        raise RuntimeError("injected: the client's GPU fell off the bus")
    return _train(self, state, cid, rnd)


def conclude(cfg, store, global_model, worker_dirs, rnd, out, sinks=()):
    marker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lost-once")
    if rnd == LOSE_ROUND and not os.path.exists(marker):
        open(marker, "w").close()
        raise RuntimeError("injected: the conclude pod was evicted")
    return _conclude(cfg, store, global_model, worker_dirs, rnd, out, sinks)


fed.Federation.train_client = train_client
seg.conclude = conclude
"""


def _project(tmp_path, fail: bool = True, **sections):
    """A tiny prepared project (FedCMI, half the clients multimodal) and the engine's run of it, in which
    client ``fail_client`` of round ``fail_round`` raises as it will in its pod (unless not ``fail``)."""
    from fedcmi.data import DataModule, prepare
    from fedcmi.federation import Federation
    from fedcmi.partition import make_partition, save_partition
    from fedcmi.round.schedule import sample_clients
    from fedcmi.runners.engine import train

    raw = merge(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY), sections)
    raw["algorithm"]["name"] = "fedcmi"
    raw["partition"]["multimodal_fraction"] = 0.5
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cfg = config_from_dict(raw)
    fail_round = 2
    fail_client = sample_clients(cfg, fail_round)[0]
    cwd = os.getcwd()
    os.chdir(tmp_path)
    real = Federation.train_client

    def flaky(self, state, cid, rnd):
        if fail and (rnd, cid) == (fail_round, fail_client):
            raise RuntimeError("injected: the client's GPU fell off the bus")
        return real(self, state, cid, rnd)

    try:
        prepare(cfg)
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes),
                       cfg.partition.file)
        Federation.train_client = flaky  # type: ignore[method-assign]
        engine = train(cfg, tmp_path / "engine", progress=False)
    finally:
        Federation.train_client = real  # type: ignore[method-assign]
        os.chdir(cwd)
    assert not fail or fail_client in engine.history[fail_round - 1].participation.rejected
    return cfg, engine, fail_round, fail_client


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_chained_local_run_with_a_failing_client_and_a_lost_run_equals_the_engine(tmp_path):
    """Three rounds in runs of two; a client fails in its pod in round 2 and the conclusion of round 3 is
    lost once. The driver resubmits, the federation resumes after round 2, no round is lost or repeated,
    and the final model is the engine's bit for bit (the engine meeting the same failing client)."""
    from mlflow import MlflowClient

    from fedcmi.io import load_state, read_json

    cfg, engine, fail_round, fail_client = _project(
        tmp_path, federation={"rounds": 3, "clients_per_round": 3}, evaluation={"every": 2})
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(fail_round=fail_round, fail_client=fail_client, lose_round=3))
    store = f"sqlite:///{tmp_path}/pipeline-mlflow.db"
    r = fedcmi("pipeline", "run-local", "--rounds-per-run", "2", "--clients-per-pod", "2", "--out", "pipe.safetensors",
               "--tracking-uri", store, "--env", f"PYTHONPATH={tmp_path / 'faults'}:{ROOT}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    # progress per round, not kfp.local's executor inputs
    assert "executor_input" not in r.stderr and "parameterValues" not in r.stderr
    assert "round 2/3: accepted" in r.stderr and "round 3/3" in r.stderr
    runs = read_json(tmp_path / "outputs" / "kfp_local" / "drive-fedcmi-seed3.json")["runs"]
    assert [x["state"] for x in runs] == ["SUCCEEDED", "FAILED", "SUCCEEDED"]

    state, _ = load_state(tmp_path / "pipe.safetensors")
    assert _same(state, engine.state), "expected bitwise equality with the engine"
    history = read_json(tmp_path / "outputs" / "federations" / "fedcmi-seed3" / "history.json")
    assert [h["round"] for h in history] == [1, 2, 3]
    engine_history = [h.to_json() for h in engine.history]
    assert history[fail_round - 1]["rejected"] == {str(fail_client): engine_history[fail_round - 1]["rejected"][str(fail_client)]}
    assert [h.get("mm_acc") for h in history] == [h.get("mm_acc") for h in engine_history]
    # the Kubeflow run shows every round: each conclude step's Metrics artifact (what the KFP UI lists)
    shown = {}
    for out in sorted((tmp_path / "outputs" / "kfp_local").glob("*/conclude-round*/executor_output.json")):
        for art in read_json(out)["artifacts"].get("round_metrics", {}).get("artifacts", []):
            if art["metadata"]:
                shown[int(art["metadata"]["round"])] = art["metadata"]
    assert sorted(shown) == [1, 2, 3]
    assert shown[2]["eval/mm_acc"] == engine_history[1]["mm_acc"] and shown[2]["round/rejected_clients"] == 1.0
    assert "eval/mm_acc" not in shown[1]  # evaluation.every=2: round 1 was not evaluated

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.tracking.experiment).experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["runner"] == "kubeflow"
    assert "ended FAILED" in run.data.tags["last_failed_run"]  # the exit handler of the failed run
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "eval/mm_acc")) == [2, 3]
    rejected = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "round/rejected_clients")}
    assert rejected == {1: 0.0, 2: 1.0, 3: 0.0}
    champion = client.get_model_version_by_alias(cfg.tracking.registered_model, "champion")
    assert champion.run_id == run.info.run_id
    from fedcmi.tracking.inputs import data_hash

    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert run.data.tags["data_hash"] == data_hash(cfg)  # the hash `dvc repro` tags, not another
    finally:
        os.chdir(cwd)

    # another federation pointed at this store: its begin step refuses, and the driver stops after that one
    # run, naming the cause, instead of resubmitting a run that would meet the same refusal
    r = fedcmi("pipeline", "run-local", "--rounds-per-run", "2", "--run-name", "other", "--set", "optim.lr=0.2",
               "--store", "outputs/federations/fedcmi-seed3", "--out", "other.safetensors", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "was refused: the store" in r.stderr and "other settings or data" in r.stderr
    other = read_json(tmp_path / "outputs" / "kfp_local" / "drive-other.json")["runs"]
    assert len(other) == 1 and "other settings" in other[0]["cause"]
    # the store removed: the driver's record says 2 successful runs; it refuses before submitting anything
    import shutil

    shutil.rmtree(tmp_path / "outputs" / "federations" / "fedcmi-seed3")
    r = fedcmi("pipeline", "run-local", "--rounds-per-run", "2", "--clients-per-pod", "2", "--out", "pipe.safetensors",
               "--tracking-uri", store, "--env", f"PYTHONPATH={tmp_path / 'faults'}:{ROOT}", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "holds 0 committed rounds, behind the 3" in r.stderr and "removed or replaced" in r.stderr
    assert len(read_json(tmp_path / "outputs" / "kfp_local" / "drive-fedcmi-seed3.json")["runs"]) == 3


@pytest.mark.slow
def test_a_local_run_with_a_slow_client_and_a_deadline_equals_the_engine(tmp_path):
    """A straggler, over-selection and a deadline: the pods write late markers for the clients the latency
    model finds late, the conclude steps count them late, and the model is the engine's bit for bit."""
    from fedcmi.io import load_state, read_json

    latency = {"model": "lognormal", "seconds_per_example": 0.05, "stragglers": [2], "straggler_slowdown": 50.0}
    cfg, engine, _, _ = _project(tmp_path, fail=False, partition={"num_clients": 6},
                                 federation={"rounds": 3, "clients_per_round": 2, "over_selection": 1.0,
                                             "deadline": 4.0, "latency": latency})
    late = [sorted(r.participation.late) for r in engine.history]
    assert any(late) and any(2 in r.participation.sampled and 2 in r.participation.late for r in engine.history)
    r = fedcmi("pipeline", "run-local", "--rounds-per-run", "3", "--clients-per-pod", "2", "--out", "pipe.safetensors",
               cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"round 1/3: accepted {engine.history[0].participation.accepted}, rejected [], late {late[0]}" in r.stderr
    state, _ = load_state(tmp_path / "pipe.safetensors")
    assert _same(state, engine.state), "expected bitwise equality with the engine"
    history = read_json(tmp_path / "outputs" / "federations" / "fedcmi-seed3" / "history.json")
    engine_history = [h.to_json() for h in engine.history]
    for key in ("clients", "accepted", "late", "simulated_seconds", "mm_acc"):
        assert [h.get(key) for h in history] == [h.get(key) for h in engine_history], key


def _docker_ready() -> str | None:
    """Why the Docker runner cannot be tried here, or None."""
    import shutil

    if shutil.which("docker") is None:
        return "no docker client"
    probe = subprocess.run(["docker", "image", "inspect", f"fedcmi:{fedcmi_version}"], capture_output=True, text=True)
    if probe.returncode != 0:
        first = (probe.stderr.strip().splitlines() or ["?"])[0]
        return f"no Docker daemon or no image fedcmi:{fedcmi_version} (docker/build-image.sh builds it): {first}"
    return None


@pytest.mark.slow
def test_the_pipeline_in_its_image_equals_the_engine(tmp_path):
    """kfp.local's Docker runner: every step in the built image, nothing installed at start, a client
    failing in its container rejected as in the engine."""
    reason = _docker_ready()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    from fedcmi.io import load_state

    cfg, engine, fail_round, fail_client = _project(tmp_path, federation={"rounds": 2, "clients_per_round": 3})
    (tmp_path / "faults").mkdir()
    (tmp_path / "faults" / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(fail_round=fail_round, fail_client=fail_client, lose_round=-1))
    r = fedcmi("pipeline", "run-local", "--runner", "docker", "--out", "pipe.safetensors",
               "--env", f"PYTHONPATH={tmp_path / 'faults'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = "\n".join(p.read_text() for p in (tmp_path / "outputs" / "kfp_local" / "logs").glob("*.log"))
    assert "Found image" in log and "pip install" not in log
    assert f"client {fail_client} failed" in r.stderr
    state, _ = load_state(tmp_path / "pipe.safetensors")
    assert _same(state, engine.state), "expected bitwise equality with the engine"


def test_driving_an_unreachable_host_is_a_clear_error_and_leaves_no_state(tmp_path):
    r = fedcmi("pipeline", "drive", "--host", "http://127.0.0.1:9", "--state", str(tmp_path / "drive.json"),
               "--set", "federation.rounds=1", cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "could not submit to Kubeflow Pipelines" in r.stderr
    assert not (tmp_path / "drive.json").exists()  # nothing was submitted, so nothing is in flight


def test_the_driver_waits_for_its_run_in_flight_and_keeps_to_its_federation(tmp_path):
    """A driver restarted while a run was in flight waits for that run (here: lost with the old driver,
    so resubmitted) and never drives a second federation from the same state file."""
    from fedcmi_pipelines.driver import IN_FLIGHT, DriveError, LocalExecutor, Plan, drive

    ran: list[dict] = []

    def run(arguments: dict) -> bool:
        ran.append(arguments)
        return len(ran) != 2  # the second run fails

    plan = Plan({"seed": 1, "run_name": "x"}, rounds=25, rounds_per_run=10)
    state_file = tmp_path / "drive.json"
    from fedcmi.io import write_json

    write_json(state_file, {"format": "fedcmi-drive/1", "arguments": plan.arguments, "rounds": 25,
                            "rounds_per_run": 10, "runs": [{"run_id": "local-gone", "state": IN_FLIGHT}]})
    state = drive(LocalExecutor(run), plan, state_file, progress=lambda _: None)
    assert [x["state"] for x in state["runs"]] == ["LOST", "SUCCEEDED", "FAILED", "SUCCEEDED", "SUCCEEDED"]
    assert len(ran) == 4 and all(dict(plan.arguments, expect_committed=e) == a for a, e in zip(ran, [0, 10, 10, 20], strict=True))
    with pytest.raises(DriveError, match="another federation"):
        drive(LocalExecutor(run), Plan({"seed": 2, "run_name": "x"}, 25, 10), state_file)
    with pytest.raises(DriveError, match="3 runs in a row failed"):
        drive(LocalExecutor(lambda a: False), Plan({"seed": 3}, 5, 10), tmp_path / "other.json",
              progress=lambda _: None)


@pytest.mark.parametrize("damage, says", [
    ({"arguments": None}, "no `arguments` object"),
    ({"runs": {"a": 1}}, "`runs` is dict, not a list"),
    ({"runs": "SUCCEEDED"}, "`runs` is str, not a list"),
    ({"runs": [{"run_id": "r1"}]}, "run 1 lacks a `run_id` or a `state`"),
    ({"runs": [["r1", "SUCCEEDED"]]}, "run 1 lacks"),
    ({"rounds_per_run": "10"}, "no whole `rounds_per_run`"),
])
def test_a_damaged_driver_state_is_one_line_naming_the_field(tmp_path, damage, says):
    from fedcmi.io import write_json
    from fedcmi_pipelines.driver import DriveError, LocalExecutor, Plan, drive

    plan = Plan({"seed": 1, "run_name": "x"}, rounds=4, rounds_per_run=2)
    state = {"format": "fedcmi-drive/1", "arguments": plan.arguments, "rounds": 4, "rounds_per_run": 2,
             "runs": [{"run_id": "r1", "state": "SUCCEEDED"}]}
    write_json(tmp_path / "drive.json", {**state, **damage})
    ran: list = []
    with pytest.raises(DriveError, match=f"damaged driver state \\({re.escape(says)}.*delete it"):
        drive(LocalExecutor(ran.append), plan, tmp_path / "drive.json", progress=lambda _: None)
    assert not ran
    # through the command line: one line, exit 1, nothing submitted
    write_json(tmp_path / "state.json", {**state, **damage})
    r = fedcmi("pipeline", "run-local", "--state", str(tmp_path / "state.json"), "--run-name", "x",
               "--pipeline-root", str(tmp_path / "root"), cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "damaged driver state" in r.stderr, r.stderr


def test_the_driver_checks_the_store_against_its_record_and_stops_on_a_refusal(tmp_path):
    """A state whose successful runs committed more than the store holds (the store was removed) is refused
    before anything is submitted; a refusal a resubmitted run would meet again stops the driver at once,
    naming its cause; repeated ordinary failures end with the last cause."""
    from fedcmi.io import read_json, write_json
    from fedcmi_pipelines.driver import DriveError, LocalExecutor, Outcome, Plan, drive

    plan = Plan({"seed": 1, "run_name": "x"}, rounds=4, rounds_per_run=2)
    write_json(tmp_path / "drive.json", {"format": "fedcmi-drive/1", "arguments": plan.arguments, "rounds": 4,
                                         "rounds_per_run": 2, "runs": [{"run_id": "a", "state": "SUCCEEDED"},
                                                                       {"run_id": "b", "state": "SUCCEEDED"}]})
    ran: list = []
    with pytest.raises(DriveError, match="store holds 0 committed rounds, behind the 4 that the 2 successful runs"):
        drive(LocalExecutor(ran.append, committed=lambda: 0), plan, tmp_path / "drive.json", progress=print)
    assert not ran
    said: list[str] = []
    state = drive(LocalExecutor(ran.append, committed=lambda: 4), plan, tmp_path / "drive.json",
                  progress=said.append)
    assert not ran and len(state["runs"]) == 2 and not said  # the store agrees: complete, nothing to do
    drive(LocalExecutor(ran.append), plan, tmp_path / "drive.json", progress=said.append)
    assert not ran and "cannot see the store" in said[0]  # a cluster's store: said, not claimed

    refused = Outcome("FAILED", "the store s holds a federation with other settings or data", permanent=True)
    with pytest.raises(DriveError, match="was refused: the store s holds a federation with other settings.*"
                                         "same refusal"):
        drive(LocalExecutor(lambda a: (ran.append(a), refused)[1]), plan, tmp_path / "other.json",
              progress=lambda _: None)
    assert len(ran) == 1  # not resubmitted
    runs = read_json(tmp_path / "other.json")["runs"]
    assert runs[0]["state"] == "FAILED" and "other settings" in runs[0]["cause"]
    with pytest.raises(DriveError, match="3 runs in a row failed \\(last: local-\\w+: task begin failed\\)"):
        drive(LocalExecutor(lambda a: Outcome("FAILED", "task begin failed")), plan, tmp_path / "third.json",
              progress=lambda _: None)
