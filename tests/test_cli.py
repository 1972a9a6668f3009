"""The fedcmi command line, run as a user runs it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml
from conftest import TINY, merge

ROOT = Path(__file__).resolve().parents[1]


def fedcmi(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedcmi.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)


def _params(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)))
    return p


def test_a_params_typo_is_one_clear_message_exit_2_and_nothing_written(tmp_path):
    _params(tmp_path)
    before = sorted(p.name for p in tmp_path.iterdir())
    for cmd in ("prepare", "partition", "train", "evaluate"):
        r = fedcmi(cmd, "--set", "algorithm.name=fedvag", cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert "algorithm.name" in r.stderr and "fedvag" in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
    r = fedcmi("train", "--set", "federaton.rounds=3", cwd=tmp_path)
    assert r.returncode == 2 and "federaton: unknown setting" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_prepare_partition_train_evaluate_from_the_command_line(tmp_path):
    _params(tmp_path)
    assert fedcmi("prepare", cwd=tmp_path).returncode == 0
    r = fedcmi("partition", cwd=tmp_path)
    assert r.returncode == 0 and "4 clients" in r.stdout
    r = fedcmi("train", "--set", "algorithm.name=fedcmi", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "round" in r.stderr  # the progress bar
    out = json.loads(r.stdout)
    assert set(out["final"]) >= {"mm_acc", "uni_acc_audio", "uni_acc_visual", "imbalance_ratio", "worst_class_acc"}
    r = fedcmi("evaluate", "--set", "algorithm.name=fedcmi", "--out", "eval.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    saved = json.loads((tmp_path / "outputs" / "train" / "metrics.json").read_text())
    assert json.loads((tmp_path / "eval.json").read_text())["mm_acc"] == saved["mm_acc"]
    # a missing model file is a clear error, not a traceback
    r = fedcmi("evaluate", "--model", "nope.safetensors", cwd=tmp_path)
    assert r.returncode == 1 and "not found" in r.stderr and "Traceback" not in r.stderr


def test_single_steps_from_the_command_line(tmp_path):
    _params(tmp_path)
    fedcmi("prepare", cwd=tmp_path)
    fedcmi("partition", cwd=tmp_path)
    assert fedcmi("init", "--out", "g0.safetensors", cwd=tmp_path).returncode == 0
    r = fedcmi("sample", "--round", "1", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    clients = json.loads(r.stdout)["clients"]
    for cid in clients:
        r = fedcmi("client-train", "--global-model", "g0.safetensors", "--client", str(cid), "--round", "1",
                   "--out", f"u{cid}.safetensors", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    r = fedcmi("aggregate", "--global-model", "g0.safetensors", "--updates", *(f"u{c}.safetensors" for c in clients),
               "--round", "1", "--out", "g1.safetensors", cwd=tmp_path)
    assert r.returncode == 0 and json.loads(r.stdout)["accepted"] == clients


def test_help_explains_each_command():
    r = subprocess.run([sys.executable, "-m", "fedcmi.cli", "--help"], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0, r.stderr
    # the command column of the listing: each command named at the start of its own line, with its help
    listed = {m.group(1): m.group(2) for m in re.finditer(r"^    ([a-z][a-z-]*)(?:  +(\S.*))?$", r.stdout, re.M)}
    expected = {"prepare", "partition", "train", "evaluate", "plots-template", "init", "sample", "client-train", "aggregate",
                "register", "pipeline", "compare"}
    assert set(listed) == expected, sorted(listed)
    assert all(listed[c] for c in expected if c != "plots-template")  # (a long name wraps its help)


def test_version_is_the_package_metadata():
    from importlib.metadata import version

    import fedcmi as package

    r = fedcmi("--version", cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == f"fedcmi {version('fedcmi')}" == f"fedcmi {package.__version__}"
