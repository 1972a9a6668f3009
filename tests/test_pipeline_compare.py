"""`fedcmi pipeline compare`: the fair comparison with every trial a federation of kfp.local pipeline runs
gives the figures `fedcmi compare` gives in-process (engine and pipeline are one code path), and a rerun
takes every finished trial from its file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, merge

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

SHARED = ["--method", "fedavg", "--method", "fedcmi", "--lrs", "0.05", "--seeds", "0", "1", "--select-seeds", "0",
          "--max-extensions", "0", "--set", "tracking.enabled=false"]


def fedcmi(*args, cwd):
    return subprocess.run([sys.executable, "-m", "fedcmi.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=1200)


def _trials(work: Path) -> dict[str, dict]:
    return {f.name: json.loads(f.read_text()) for f in sorted((work / "trials").glob("*.json"))}


def test_pipeline_trials_give_the_engines_figures_and_a_rerun_skips_them(tmp_path):
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    r = fedcmi("pipeline", "compare", "--rounds-per-run", "1", "--work", "outputs/cmp-kfp", *SHARED, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "kfp.local (subprocess)" in r.stderr and "run 2 (" in r.stderr  # two chained runs per trial
    e = fedcmi("compare", "--jobs", "1", "--work", "outputs/cmp-engine", *SHARED, cwd=tmp_path)
    assert e.returncode == 0, e.stderr[-3000:]

    pipe, engine = _trials(tmp_path / "outputs/cmp-kfp"), _trials(tmp_path / "outputs/cmp-engine")
    assert sorted(pipe) == sorted(engine) and len(pipe) == 4
    for name in pipe:  # the same models: every test and validation figure and the whole curve
        for part in ("test", "val", "curve"):
            assert pipe[name][part] == engine[name][part], (name, part)
    stores = sorted(p.name for p in (tmp_path / "outputs/cmp-kfp/stores").iterdir())
    assert len(stores) == 4 and all((tmp_path / "outputs/cmp-kfp/stores" / s / "final_val.json").is_file()
                                    for s in stores)
    summary = json.loads((tmp_path / "outputs/cmp-kfp/report/summary.json").read_text())
    assert summary["command"].startswith("fedcmi pipeline compare")
    assert (tmp_path / "outputs/cmp-kfp/report/report.html").is_file()

    before = {f: f.stat().st_mtime_ns for f in (tmp_path / "outputs/cmp-kfp/trials").iterdir()}
    again = fedcmi("pipeline", "compare", "--rounds-per-run", "1", "--work", "outputs/cmp-kfp", *SHARED,
                   cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "(2 already done)" in again.stderr and "kfp.local" not in again.stderr
    assert {f: f.stat().st_mtime_ns for f in (tmp_path / "outputs/cmp-kfp/trials").iterdir()} == before


def test_work_outside_the_data_root_is_one_line(tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(yaml.safe_load((ROOT / "params.yaml").read_text()),
                                                               TINY)))
    r = fedcmi("pipeline", "compare", "--work", str(tmp_path.parent / "elsewhere"), "--data-root", str(tmp_path),
               *SHARED, cwd=tmp_path)
    assert r.returncode == 2 and "lies outside --data-root" in r.stderr
    assert "Traceback" not in r.stderr
