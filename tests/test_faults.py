"""Fault injection: bad client updates, kill -9 at chosen points, full and unwritable disks, corrupt files.

Every crash test ends the same way: the files left behind all load, a rerun
resumes from the last complete round, and the final model is bitwise the one
an uninterrupted run gives. Nothing already written is lost.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, merge
from faults import ROOT, fedcmi_project, run_cli

from fedcmi.config import load_config
from fedcmi.io import load_state, write_bytes
from fedcmi.round.schedule import sample_clients

ROUNDS = 4


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A prepared and partitioned tiny project: FedCMI, half the clients multimodal, 4 rounds."""
    return fedcmi_project(tmp_path_factory.mktemp("faults"), rounds=ROUNDS)


def train(project: Path, name: str, fault: dict | None = None, *extra: str):
    return run_cli(["train", "--no-progress", "--set", f"output.dir=outputs/{name}", *extra], project, fault)


def final(project: Path, name: str) -> tuple[dict, list]:
    state, _ = load_state(project / "outputs" / name / "train" / "model.safetensors")
    history = json.loads((project / "outputs" / name / "train" / "history.json").read_text())
    return state, [{k: v for k, v in r.items() if k != "seconds"} for r in history]


@pytest.fixture(scope="module")
def baseline(project):
    r = train(project, "baseline")
    assert r.returncode == 0, r.stderr
    return final(project, "baseline")


def assert_intact(train_dir: Path) -> int:
    """Every committed file loads; returns the completed rounds state.json names (0 if none)."""
    ckpt = train_dir / "checkpoints"
    for f in sorted(ckpt.glob("round_*.safetensors")) + sorted(train_dir.glob("*.safetensors")):
        load_state(f)
    for f in sorted(train_dir.glob("*.json")):
        json.loads(f.read_text())
    if not (ckpt / "state.json").is_file():
        return 0
    meta = json.loads((ckpt / "state.json").read_text())
    load_state(ckpt / meta["model_file"])
    assert len(meta["history"]) == meta["completed_rounds"]
    return meta["completed_rounds"]


def assert_same_as_baseline(project: Path, name: str, baseline) -> None:
    state, history = final(project, name)
    base_state, base_history = baseline
    assert state.keys() == base_state.keys()
    assert all(torch.equal(state[k], base_state[k]) for k in state), "resumed model differs from uninterrupted"
    assert history == base_history
    leftovers = [p.name for p in (project / "outputs" / name).rglob("*.tmp")]
    assert not leftovers, f"temporary files left behind: {leftovers}"


def second_client_of_round_2(project: Path) -> int:
    return sample_clients(load_config(project / "params.yaml"), 2)[1]


CRASHES = {
    "inside a client's training in round 2": ({"kind": "kill_client", "round": 2}, 1),
    "half-way through writing the round-2 model": ({"kind": "kill_before_replace", "file": "round_00002.safetensors"}, 1),
    "between the round-2 model and its state.json": ({"kind": "kill_after_replace", "file": "round_00002.safetensors"}, 1),
    "half-way through writing state.json of round 3": ({"kind": "kill_before_replace", "file": "state.json", "nth": 3}, 2),
    "after the last checkpoint, before the outputs": ({"kind": "kill_after_replace", "file": "state.json", "nth": 4}, 4),
    "half-way through writing the final model": ({"kind": "kill_before_replace", "file": "model.safetensors"}, 4),
}


@pytest.mark.parametrize("where", list(CRASHES))
def test_kill_9_then_rerun_resumes_and_ends_with_the_uninterrupted_model(project, baseline, where):
    fault, rounds_kept = CRASHES[where]
    if fault["kind"] == "kill_client":
        fault = {**fault, "client": second_client_of_round_2(project)}
    name = "crash_" + "_".join(where.split()[:6]).replace("-", "")
    r = train(project, name, fault)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    assert assert_intact(project / "outputs" / name / "train") == rounds_kept
    r = train(project, name, None, "--resume", "must")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["resumed_from_round"] == rounds_kept
    assert_same_as_baseline(project, name, baseline)


def test_kill_9_from_outside_at_an_arbitrary_moment(project, baseline):
    """A real SIGKILL from another process, as soon as the run has checkpointed a round."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fedcmi.cli", "train", "--no-progress",
                             "--set", "output.dir=outputs/outside"], cwd=project, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = project / "outputs/outside/train/checkpoints/state.json"
    deadline = time.monotonic() + 300
    while proc.poll() is None and not state.exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert_intact(project / "outputs/outside/train")
    r = train(project, "outside")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_as_baseline(project, "outside", baseline)


# -- client faults --------------------------------------------------------------------------------------
def _corrupt(kind: str):
    def corrupt(update):
        key = next(k for k, v in update.state.items() if v.is_floating_point())
        if kind == "raises":
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        if kind == "NaN":
            update.state[key] = torch.full_like(update.state[key], float("nan"))
        elif kind == "Inf":
            update.state[key] = update.state[key].clone().index_fill_(0, torch.tensor([0]), float("inf"))
        elif kind == "shape":
            update.state[key] = torch.zeros(*update.state[key].shape, 2)
        elif kind == "missing key":
            del update.state[key]
        elif kind == "extra key":
            update.state["backdoor.weight"] = torch.zeros(3)
        elif kind == "zero samples":
            update.num_examples = 0
        return update
    return corrupt


REASONS = {"raises": "CUDA error", "NaN": "NaN or Inf", "Inf": "NaN or Inf", "shape": "shape",
           "missing key": "keys differ", "extra key": "keys differ", "zero samples": "num_examples must be a positive integer"}


@pytest.mark.parametrize("kind", list(REASONS))
def test_a_bad_client_update_is_rejected_with_its_reason_and_the_round_completes(tiny, monkeypatch, caplog, kind):
    from fedcmi.federation import Federation
    from fedcmi.runners.engine import train

    cfg = tiny(algorithm={"name": "fedcmi"}, federation={"rounds": 2, "clients_per_round": 3, "batch_size": 16})
    bad = sample_clients(cfg, 1)[1]
    real = Federation.train_client

    def faulty(self, state, cid, rnd):
        u = real(self, state, cid, rnd)
        return _corrupt(kind)(u) if (rnd, cid) == (1, bad) else u

    monkeypatch.setattr(Federation, "train_client", faulty)
    res = train(cfg, progress=False)
    first = res.history[0].participation
    assert list(first.rejected) == [bad] and REASONS[kind] in first.rejected[bad]
    assert first.accepted == [c for c in first.sampled if c != bad]
    assert any(REASONS[kind] in rec.message for rec in caplog.records if rec.levelname == "WARNING")
    assert all(torch.isfinite(v).all() for v in res.state.values() if v.is_floating_point())
    assert res.history[1].participation.rejected == {}


def test_a_round_without_enough_valid_updates_fails_and_the_last_good_model_stays(project, baseline):
    r = train(project, "round_fails", {"kind": "raise_clients", "round": 3})
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "round 3: 0 valid update(s), federation.min_clients is 1" in r.stderr
    assert "injected fault" in r.stderr
    train_dir = project / "outputs/round_fails/train"
    assert assert_intact(train_dir) == 2  # rounds 1 and 2 of the history: the model after round 2 is in place
    assert not (train_dir / "model.safetensors").exists()
    r = train(project, "round_fails")  # the fault is gone: the run resumes and ends as if nothing happened
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_as_baseline(project, "round_fails", baseline)


def test_a_round_where_no_sampled_client_can_train_leaves_the_model_and_goes_on(tiny):
    from fedcmi.data import DataModule
    from fedcmi.federation import Federation
    from fedcmi.partition import load_partition
    from fedcmi.round.close import close_round
    from fedcmi.round.outcomes import client_outcomes

    cfg = tiny(algorithm={"name": "unimodal", "modality": "audio"}, partition={"multimodal_fraction": 0.0,
               "num_clients": 4, "min_samples": 4})
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    visual_only = {c.id for c in fed.partition.clients if c.modalities == ("visual",)}
    rnd = next(r for r in range(1, 1000) if set(sample_clients(cfg, r)) <= visual_only)  # a round of only them
    clients = sample_clients(cfg, rnd)
    state = fed.initial_state()
    closed = close_round(fed, state, clients, client_outcomes(fed, state, clients, rnd), rnd)
    res = closed.record.participation
    assert res.idle == clients and res.accepted == []
    assert all(torch.equal(closed.state[k], state[k]) for k in state)


# -- the disk -------------------------------------------------------------------------------------------
def _mount_tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    opts = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB filesystem (tmpfs) where one can be mounted; else None (the fault caps file sizes instead)."""
    mnt = tmp_path / "small_disk"
    if os.geteuid() == 0 and shutil.which("mount") and _mount_tmpfs(mnt, "4m"):
        yield mnt
        _umount(mnt)
    else:
        yield None


def test_a_disk_that_fills_mid_run_is_a_clear_error_and_the_last_checkpoint_survives(project, baseline, small_disk):
    if small_disk is not None:
        out = small_disk / "run"
        fault = {"kind": "fill_after_replace", "file": "state.json", "nth": 1, "fill_dir": str(small_disk)}
    else:
        out = project / "outputs" / "full"
        fault = {"kind": "fill_after_replace", "file": "state.json", "nth": 1, "fsize_limit": 4096}
    r = run_cli(["train", "--no-progress", "--set", f"output.dir={out}"], project, fault)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "cannot write" in r.stderr
    assert any(s in r.stderr for s in ("No space left on device", "File too large"))
    assert assert_intact(out / "train") == 1
    assert not list((out / "train").rglob("*.tmp")), "a failed write left its temporary file"
    if small_disk is not None:
        (small_disk / "junk").unlink()
    r = run_cli(["train", "--no-progress", "--set", f"output.dir={out}"], project)
    assert r.returncode == 0, r.stderr[-2000:]
    state, _ = load_state(out / "train" / "model.safetensors")
    assert all(torch.equal(state[k], baseline[0][k]) for k in state)


def test_prepare_onto_a_full_disk_is_a_clear_error_and_keeps_the_previous_data(project, small_disk, tmp_path):
    if small_disk is None:
        pytest.skip("no small filesystem can be mounted here (needs root); the file-size cap case is covered above")
    prepared = small_disk / "prepared"
    r = run_cli(["prepare", "--set", f"data.prepared_dir={prepared}"], project)
    assert r.returncode == 0, r.stderr
    before = (prepared / "train" / "audio.npy").read_bytes()
    r = run_cli(["prepare", "--set", f"data.prepared_dir={prepared}", "--set", "data.synthetic.num_train=4000"],
                project)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "No space left on device" in r.stderr and "cannot write" in r.stderr
    assert (prepared / "train" / "audio.npy").read_bytes() == before
    assert not (small_disk / ".prepared.tmp").exists()


@pytest.fixture
def unwritable(tmp_path):
    """A folder no one may write into: mode 0555, or for root an immutable folder or a read-only mount."""
    d = tmp_path / "locked"
    d.mkdir()
    undo = None
    if os.geteuid() != 0:
        d.chmod(0o555)
        undo = lambda: d.chmod(0o755)  # noqa: E731
    elif subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(d)], capture_output=True)  # noqa: E731
    elif _mount_tmpfs(d, "1m", readonly=True):
        undo = lambda: _umount(d)  # noqa: E731
    else:
        pytest.skip("cannot make a folder unwritable for root here (no chattr, no mount)")
    try:
        (d / "probe").write_text("x")
    except OSError:
        pass
    else:
        undo()
        pytest.skip("the folder stayed writable")
    yield d
    undo()


@pytest.mark.parametrize("command,setting", [("train", "output.dir"), ("prepare", "data.prepared_dir"),
                                             ("partition", "partition.file")])
def test_an_unwritable_output_is_a_clear_error_before_any_work(project, unwritable, command, setting):
    target = unwritable / ("p.json" if setting == "partition.file" else "out")
    r = run_cli([command, "--set", f"{setting}={target}"], project)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and str(unwritable) in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert list(unwritable.iterdir()) == []


# -- corrupt and untrusted files ------------------------------------------------------------------------
class _Exploit:
    """A pickle that runs a command when loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("suffix", [".pt", ".pth", ".safetensors", ".ckpt"])
def test_a_crafted_pickle_is_refused_and_never_runs(tmp_path, suffix):
    import pickle

    from fedcmi.io import ModelFileError

    marker = tmp_path / "pwned"
    evil = tmp_path / f"evil{suffix}"
    if suffix in (".pt", ".pth"):
        torch.save({"w": torch.zeros(1), "x": _Exploit(marker)}, evil)
    else:
        evil.write_bytes(pickle.dumps({"w": _Exploit(marker)}))
    with pytest.raises(ModelFileError, match="refused|not a readable safetensors|is damaged"):
        load_state(evil)
    assert not marker.exists()


def test_a_crafted_pickle_given_to_the_command_line_is_refused(project, tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"w": _Exploit(marker)}, tmp_path / "evil.pt")
    for args in (["evaluate", "--model", str(tmp_path / "evil.pt")],
                 ["aggregate", "--global-model", str(tmp_path / "evil.pt"), "--updates", str(tmp_path / "evil.pt"),
                  "--round", "1", "--out", str(tmp_path / "g.safetensors")]):
        r = run_cli(args, project)
        assert r.returncode == 1 and "refused" in r.stderr and "Traceback" not in r.stderr
    assert not marker.exists() and not (tmp_path / "g.safetensors").exists()


def test_a_weights_only_torch_file_is_accepted(tmp_path):
    torch.save({"w": torch.arange(3.0)}, tmp_path / "ok.pt")
    state, _ = load_state(tmp_path / "ok.pt")
    assert state["w"].tolist() == [0.0, 1.0, 2.0]


def test_atomic_writes_leave_the_modes_an_ordinary_write_would(tmp_path):
    old = os.umask(0o027)
    try:
        write_bytes(tmp_path / "new.json", b"{}")  # a new file: what the umask allows, not mkstemp's 0600
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
        kept = tmp_path / "kept.json"
        kept.write_bytes(b"{}")
        kept.chmod(0o604)
        write_bytes(kept, b'{"a": 1}')  # a replaced file keeps its mode
        assert kept.stat().st_mode & 0o777 == 0o604 and kept.read_bytes() == b'{"a": 1}'
    finally:
        os.umask(old)


def _corrupt_file(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"truncate": data[: len(data) // 2], "garbage": b"\x00\xffnot this" * 10,
                      "empty": b""}[how])


CORRUPT = {
    "partition.json truncated": ("data/partition.json", "truncate", ["train"], "partition"),
    "partition.json garbage": ("data/partition.json", "garbage", ["train"], "partition"),
    "partition.json empty": ("data/partition.json", "empty", ["train"], "partition"),
    "prepared meta.json garbage": ("data/prepared/meta.json", "garbage", ["partition"], "meta.json"),
    "prepared array truncated": ("data/prepared/train/audio.npy", "truncate", ["train"], "audio.npy"),
    "prepared labels garbage": ("data/prepared/train/label.npy", "garbage", ["partition"], "label.npy"),
    "model file truncated": ("outputs/baseline/train/model.safetensors", "truncate",
                             ["evaluate", "--model", "outputs/baseline/train/model.safetensors"], "safetensors"),
    "model file empty": ("outputs/baseline/train/model.safetensors", "empty",
                         ["evaluate", "--model", "outputs/baseline/train/model.safetensors"], "safetensors"),
}


@pytest.mark.parametrize("name", list(CORRUPT))
def test_a_corrupt_file_is_one_clear_error(project, baseline, tmp_path, name):
    rel, how, args, needle = CORRUPT[name]
    copy = tmp_path / "copy"
    shutil.copytree(project, copy, ignore=shutil.ignore_patterns("crash_*", "outside", "full", "round_fails"))
    _corrupt_file(copy / rel, how)
    r = run_cli(args, copy)
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and needle in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(project, baseline):
    r = train(project, "damaged", {"kind": "kill_after_replace", "file": "state.json", "nth": 3})
    assert r.returncode == -signal.SIGKILL
    _corrupt_file(project / "outputs/damaged/train/checkpoints/round_00003.safetensors", "truncate")
    r = train(project, "damaged")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["resumed_from_round"] == 2
    assert_same_as_baseline(project, "damaged", baseline)


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("target", ["data", "notes", "."])
def test_prepare_never_replaces_a_folder_that_is_not_its_prepared_data(tmp_path, target):
    """A typo such as data.prepared_dir=data (which holds data/raw) or a folder of notes: one clear error
    before any decoding, every file left as it was. (It renamed such a folder aside and removed it.)"""
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for name, text in {"data/raw/README": "the raw data", "notes/todo.txt": "keep me"}.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    before = _files(tmp_path)
    r = run_cli(["prepare", "--set", f"data.prepared_dir={target}"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "data.prepared_dir" in r.stderr and ("left untouched" in r.stderr or "must never replace" in r.stderr)
    assert _files(tmp_path) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith((".tmp", ".old"))]


def test_prepare_at_the_file_system_root_is_a_clear_error(tmp_path):
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    r = run_cli(["prepare", "--set", "data.prepared_dir=/"], tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr and "must never replace" in r.stderr, r.stderr


def test_prepare_replaces_its_own_prepared_folder_and_an_empty_one(tmp_path):
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data" / "prepared").mkdir(parents=True)  # empty: nothing to lose
    assert run_cli(["prepare"], tmp_path).returncode == 0
    r = run_cli(["prepare", "--set", "seed=4"], tmp_path)  # its own: replaced whole
    assert r.returncode == 0, r.stderr
    meta = json.loads((tmp_path / "data" / "prepared" / "meta.json").read_text())
    assert meta["source"]["seed"] == 4
