"""Two writers on one folder: the second fails at once naming the first, and nothing of the first's is touched.

The holder is a real second process; killing it with SIGKILL must free the lock (no stale lock to
remove by hand).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, merge
from faults import ROOT, run_cli

from fedcmi.locks import Busy, beside, exclusive, inside

HOLD = """
import sys, time
from fedcmi.locks import exclusive
with exclusive(sys.argv[1], "test"):
    print("held", flush=True)
    time.sleep(600)
"""


@pytest.fixture
def project(tmp_path):
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for cmd in ("prepare", "partition"):
        r = run_cli([cmd], tmp_path)
        assert r.returncode == 0, r.stderr
    return tmp_path


def hold(lock: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.endswith((".fedcmi.lock", ".fedcmi-lock"))}


def test_a_second_train_on_one_output_folder_fails_naming_the_first_and_a_kill_frees_it(project):
    assert run_cli(["train", "--no-progress"], project).returncode == 0
    out = project / "outputs" / "train"
    before = files(out)
    holder = hold(inside(out))
    try:
        r = run_cli(["train", "--no-progress", "--resume", "never"], project)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert f"is in use by process {holder.pid}" in r.stderr and str(out.name) in r.stderr
        assert files(out) == before  # not one file of the first writer's replaced or removed
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    r = run_cli(["train", "--no-progress"], project)  # the killed holder left no stale lock
    assert r.returncode == 0, r.stderr


def test_stale_temporaries_are_cleaned_only_by_the_lock_holder(project):
    """A writer in flight has a temporary file in the checkpoint folder; a second run must not delete it."""
    out = project / "outputs" / "train"
    tmp = out / "checkpoints" / ".round_00001.safetensors.0123456789abcdef.tmp"
    tmp.parent.mkdir(parents=True)
    tmp.write_bytes(b"in flight")
    holder = hold(inside(out))
    try:
        assert run_cli(["train", "--no-progress"], project).returncode == 1
        assert tmp.read_bytes() == b"in flight"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run_cli(["train", "--no-progress"], project).returncode == 0
    assert not tmp.exists()  # the next holder found it stale and removed it


def test_prepare_and_partition_wait_for_no_one(project):
    prepared, partition = project / "data" / "prepared", project / "data" / "partition.json"
    before = files(project / "data")
    for lock, cmd, what in ((beside(prepared), "prepare", "the prepared data"),
                            (beside(partition), "partition", "the partition file")):
        holder = hold(lock)
        try:
            r = run_cli([cmd, "--set", "seed=5"], project)
            assert r.returncode == 1 and what in r.stderr and "Traceback" not in r.stderr, r.stderr
        finally:
            holder.send_signal(signal.SIGKILL)
            holder.wait()
    assert files(project / "data") == before


def test_a_lock_is_reentrant_in_its_process_and_released_after(tmp_path):
    lock = tmp_path / "x.lock"
    with exclusive(lock, "x"), exclusive(lock, "x"):
        pass
    holder = hold(lock)
    try:
        with pytest.raises(Busy, match=f"process {holder.pid}"), exclusive(lock, "the thing"):
            pass
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with exclusive(lock, "x"):
        pass
