"""Clients trained in worker processes: the model never depends on how many workers ran them.

Every run here is a real ``fedcmi train`` (a child process that starts its own
worker processes); every model is compared bitwise with the run that trains
each client in turn in one process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import TINY, merge
from faults import ROOT, fedcmi_project, run_cli, worker_fault

from fedcmi.config import ConfigError, config_from_dict, load_config
from fedcmi.io import load_state
from fedcmi.round.schedule import sample_clients
from fedcmi.round.update_files import read_update
from fedcmi.workers import resolve_workers

ROUNDS = 3


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A tiny FedCMI project where every round trains all 4 clients, half of them multimodal."""
    return fedcmi_project(tmp_path_factory.mktemp("workers"), rounds=ROUNDS, clients_per_round=4)


def train(project: Path, name: str, workers: int, *extra: str, env: dict[str, str] | None = None):
    return run_cli(["train", "--no-progress", "--set", f"output.dir=outputs/{name}", "--set",
                    f"federation.workers={workers}", *extra], project, env_extra=env)


def final(project: Path, name: str) -> tuple[dict, list]:
    """The final model and the history without what may differ between equal runs (time, workers)."""
    out = project / "outputs" / name / "train"
    state, _ = load_state(out / "model.safetensors")
    history = json.loads((out / "history.json").read_text())
    return state, [{k: v for k, v in r.items() if k not in ("seconds", "workers")} for r in history]


def assert_same(got: tuple[dict, list], want: tuple[dict, list]) -> None:
    assert got[0].keys() == want[0].keys()
    differ = [k for k in got[0] if not torch.equal(got[0][k], want[0][k])]
    assert not differ, f"tensors differ from the one-process run: {differ[:5]}"
    assert got[1] == want[1]


@pytest.fixture(scope="module")
def one_process(project):
    r = train(project, "one", 1)
    assert r.returncode == 0, r.stderr[-3000:]
    return final(project, "one")


@pytest.mark.parametrize("workers", [2, 3])
def test_the_final_model_is_bitwise_the_same_for_any_number_of_workers(project, one_process, workers):
    r = train(project, f"w{workers}", workers)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(final(project, f"w{workers}"), one_process)
    history = json.loads((project / f"outputs/w{workers}/train/history.json").read_text())
    assert [rec["workers"] for rec in history] == [workers] * ROUNDS  # the choice is recorded with the run


def test_a_run_resumed_with_another_number_of_workers_ends_with_the_same_model(project, one_process):
    r = train(project, "resumed", 2, "--set", "federation.rounds=2")
    assert r.returncode == 0, r.stderr[-3000:]
    r = train(project, "resumed", 1, "--resume", "must")  # the worker count is not part of the run's identity
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout)["resumed_from_round"] == 2
    assert_same(final(project, "resumed"), one_process)


def test_a_killed_run_leaves_no_worker_behind_and_resumes_to_the_same_model(project, one_process):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fedcmi.cli", "train", "--no-progress", "--set",
                             "output.dir=outputs/killed", "--set", "federation.workers=2"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = project / "outputs/killed/train/checkpoints/state.json"
    deadline = time.monotonic() + 300
    workers: list[psutil.Process] = []
    while proc.poll() is None and not state.exists() and time.monotonic() < deadline:
        workers = psutil.Process(proc.pid).children() or workers
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    workers = psutil.Process(proc.pid).children() or workers
    assert len(workers) == 2
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(workers, timeout=20)
    assert not alive, f"worker processes outlived the killed run: {[p.pid for p in alive]}"
    r = train(project, "killed", 2, "--resume", "must")
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same(final(project, "killed"), one_process)


def test_a_worker_killed_in_a_client_costs_a_retry_not_the_result(project, one_process, tmp_path):
    victim = sample_clients(load_config(project / "params.yaml"), 2)[2]
    r = train(project, "retried", 2, env=worker_fault(tmp_path / "site", 2, victim, always=False))
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"the worker training client {victim} died (signal 9); training it again" in r.stderr
    assert_same(final(project, "retried"), one_process)


def test_a_client_that_kills_its_worker_every_time_is_rejected_and_the_run_goes_on(project, tmp_path):
    victim = sample_clients(load_config(project / "params.yaml"), 2)[0]
    r = train(project, "deadly", 2, env=worker_fault(tmp_path / "site", 2, victim, always=True))
    assert r.returncode == 0, r.stderr[-3000:]
    history = json.loads((project / "outputs/deadly/train/history.json").read_text())
    assert history[1]["rejected"] == {str(victim): f"client {victim}: training failed: its worker process died "
                                                   "2 times (signal 9: killed, or out of memory)"}
    assert victim not in history[1]["accepted"] and len(history[1]["accepted"]) == 3
    assert [len(h["accepted"]) for h in (history[0], history[2])] == [4, 4]


def test_a_pipeline_worker_step_writes_the_same_updates_with_processes(tiny, tmp_path):
    from fedcmi.runners import store as store_

    cfg = tiny(federation={"clients_per_round": 4, "workers": 2})
    store, start = tmp_path / "store", tmp_path / "global.safetensors"
    store_.begin(cfg, store, start)
    files = {}
    for workers in (1, 2):
        c = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"workers": workers})})
        out = tmp_path / f"w{workers}"
        assert store_.train_worker(c, start, 1, 0, 4, out, progress=lambda s: None) == sorted(range(4))
        files[workers] = {p.name: read_update(p, 1) for p in sorted(out.iterdir())}
    assert files[1].keys() == files[2].keys() and len(files[1]) == 4
    for name, one in files[1].items():
        two = files[2][name]
        assert one is not None and two is not None
        assert (one.num_examples, one.modalities) == (two.num_examples, two.modalities)
        assert all(torch.equal(one.state[k], two.state[k]) for k in one.state), name


def test_auto_is_the_usable_cpus_over_threads_and_never_more_than_the_clients(tmp_path, monkeypatch):
    import fedcmi.workers

    monkeypatch.setattr(fedcmi.workers, "usable_cpus", lambda: 8)

    def cfg(**fed):
        return config_from_dict(merge(TINY, {"device": "cpu", "partition": {"num_clients": 6},
                                             "federation": {"clients_per_round": 6, **fed}}))

    assert resolve_workers(cfg(workers="auto")) == 6
    assert resolve_workers(cfg(workers="auto").model_copy(update={"threads": 2})) == 4
    assert resolve_workers(cfg(workers="auto").model_copy(update={"threads": 0})) == 1  # torch's own threads
    assert resolve_workers(cfg(workers=3)) == 3
    assert resolve_workers(cfg(workers=3), clients=2) == 2
    on_gpu = cfg(workers="auto").model_copy(update={"device": "cuda"})
    assert resolve_workers(on_gpu) == fedcmi.workers.GPU_AUTO_CAP  # each worker holds a CUDA context
    assert resolve_workers(on_gpu.model_copy(update={"federation": on_gpu.federation.model_copy(
        update={"workers": 6})})) == 6  # a number given is taken as it is


@pytest.mark.parametrize("value", [0, -1, 2000, "many", 1.5, True])
def test_a_bad_worker_count_is_one_error_naming_the_field(value):
    with pytest.raises(ConfigError) as err:
        config_from_dict(merge(TINY, {"federation": {"workers": value}}))
    assert "federation.workers" in str(err.value)


def test_a_round_given_up_half_way_leaves_nothing_stale_for_the_next(tiny):
    from fedcmi.data import DataModule
    from fedcmi.federation import Federation
    from fedcmi.partition import load_partition
    from fedcmi.workers import ClientWorkers

    cfg = tiny(federation={"clients_per_round": 4, "workers": 2})
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    state = fed.initial_state()
    with ClientWorkers(cfg, 2) as pool:
        first = pool.outcomes(state, [0, 1, 2, 3], 0)
        next(first)
        first.close()  # the caller stops reading round 0 with two clients still training
        got = [(cid, produce()) for cid, produce in pool.outcomes(state, [3, 1, 0, 2], 1)]
    assert [cid for cid, _ in got] == [3, 1, 0, 2]  # in the order asked for, whatever finished first
    for cid, update in got:
        want = fed.train_client(state, cid, 1)
        assert update is not None and want is not None
        assert update.num_examples == want.num_examples and update.metrics == want.metrics
        assert all(torch.equal(update.state[k], want.state[k]) for k in want.state), cid
