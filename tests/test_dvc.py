"""The main job: a real `dvc repro` in a temporary git copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, merge

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
DVC = [sys.executable, "-m", "dvc"]


def sh(cmd, cwd, check=True, env_extra=None):
    bindir = str(Path(sys.executable).parent)  # where the `fedcmi` console script lives
    env = {**os.environ, "PATH": bindir + os.pathsep + os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)}
    env.update(env_extra or {})
    env.pop("MLFLOW_TRACKING_URI", None)
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=900)
    if check and r.returncode != 0:
        raise AssertionError(f"{cmd} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture
def repo(tmp_path):
    for name in ("dvc.yaml", ".dvcignore", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / ".dvc", tmp_path / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    shutil.copytree(ROOT / "fedcmi", tmp_path / "fedcmi", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "data" / "raw", tmp_path / "data" / "raw")
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["tracking"]["enabled"] = True
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / ".gitignore").write_text((ROOT / ".gitignore").read_text())
    sh(["git", "init", "-q"], tmp_path)
    sh(["git", "add", "-A"], tmp_path)
    sh(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init"], tmp_path)
    return tmp_path


def traced(trace: Path) -> dict:
    """Run with ``tests/module_trace`` on the path, every Python process records the fedcmi files it imported."""
    trace.mkdir()
    return {"PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "module_trace")]),
            "FEDCMI_MODULE_TRACE": str(trace)}


def source_path(path: str) -> str:
    """``fedcmi/...`` of an imported file, from this checkout or the test's copy of it."""
    parts = Path(path).resolve().parts
    return Path(*parts[len(parts) - 1 - parts[::-1].index("fedcmi"):]).as_posix()


def loaded_by(trace: Path) -> dict[str, set[str]]:
    """fedcmi command (``train``, ...) -> the fedcmi source files its process imported."""
    out: dict[str, set[str]] = {}
    for f in sorted(trace.glob("*.json")):
        rec = json.loads(f.read_text())
        if len(rec["argv"]) > 1 and Path(rec["argv"][0]).name == "fedcmi":
            out.setdefault(rec["argv"][1], set()).update(source_path(p) for p in rec["files"])
    return out


def check_code_deps(repo: Path, loaded: dict[str, set[str]], validation_only: set[str]) -> None:
    """Each stage depends on every fedcmi file its command imported; the data stages may leave out what every
    command imports before it starts (the command line and the whole params file's validation)."""
    stages = yaml.safe_load((repo / "dvc.yaml").read_text())["stages"]
    for name, stage in stages.items():
        command = stage["cmd"].split()[1]
        deps = [str(d).rstrip("/") for d in stage["deps"]]
        need = loaded[command] - (validation_only if name in ("prepare", "partition") else set())
        missing = sorted(f for f in need if not any(f == d or f.startswith(d + "/") for d in deps))
        assert not missing, f"dvc.yaml stage {name!r} runs but does not depend on {missing}"


def test_dvc_repro_end_to_end_then_only_train_reruns(repo, tmp_path_factory):
    trace = tmp_path_factory.mktemp("trace") / "modules"
    out = sh(DVC + ["repro"], repo, env_extra=traced(trace)).stdout
    check = tmp_path_factory.mktemp("trace") / "validate"
    sh([sys.executable, "-c", "import fedcmi.cli as c; c.build_parser(); c.load_config('params.yaml')"], repo,
       env_extra=traced(check))
    validation_only = {source_path(p) for f in check.glob("*.json") for p in json.loads(f.read_text())["files"]}
    check_code_deps(repo, loaded_by(trace), validation_only)
    for stage in ("prepare", "partition", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    metrics = json.loads((repo / "outputs/eval/metrics.json").read_text())
    assert {"mm_acc", "uni_acc_audio", "uni_acc_visual", "probe_acc_visual", "worst_class_acc"} <= set(metrics)
    assert len(json.loads((repo / "outputs/train/history.json").read_text())) == 2
    for png in ("outputs/train/curves.png", "outputs/eval/confusion.png"):
        assert (repo / png).read_bytes()[:4] == b"\x89PNG"
    reg = json.loads((repo / "outputs/register.json").read_text())
    assert reg["promoted"] and reg["version"] == 1

    db = sqlite3.connect(repo / "mlflow.db")
    assert db.execute("select count(*) from runs").fetchone()[0] == 1
    steps = db.execute("select step from metrics where key='eval/mm_acc' order by step").fetchall()
    assert [s[0] for s in steps] == [1, 2]
    # the headline once: the evaluate stage adds the confusion matrix, not a copy of the last round's figures
    assert db.execute("select count(*) from metrics where key like '%mm_acc'").fetchone()[0] == 2
    assert db.execute("select alias from registered_model_aliases order by alias").fetchall() == [
        ("candidate",), ("champion",)]
    db.close()

    assert "mm_acc" in sh(DVC + ["metrics", "show"], repo).stdout
    shown = sh(DVC + ["plots", "show", "-o", "plots_html"], repo)
    assert (repo / "plots_html" / "index.html").exists(), shown.stdout

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["federation"]["rounds"] = 3
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    again = sh(DVC + ["repro"], repo).stdout
    assert "Running stage 'prepare'" not in again and "Running stage 'partition'" not in again
    assert "Running stage 'train'" in again
    assert len(json.loads((repo / "outputs/train/history.json").read_text())) == 3
    db = sqlite3.connect(repo / "mlflow.db")  # the extended training continued its run
    assert db.execute("select count(*) from runs").fetchone()[0] == 1
    steps = db.execute("select step from metrics where key='eval/mm_acc' order by step").fetchall()
    assert [s[0] for s in steps] == [1, 2, 3]
    db.close()
    diff = sh(DVC + ["params", "diff"], repo).stdout
    assert "federation.rounds" in diff


def test_dvc_exp_run_compares_algorithms(repo):
    sh(DVC + ["exp", "run", "-S", "algorithm.name=fedavg", "-S", "tracking.enabled=false"], repo)
    sh(DVC + ["exp", "run", "-S", "algorithm.name=fedcmi", "-S", "tracking.enabled=false"], repo)
    keep = "Experiment|mm_acc|uni_acc_.*|worst_class_acc|algorithm.name"
    shown = sh(DVC + ["exp", "show", "--no-pager", "--md", "--drop", ".*", "--keep", keep], repo).stdout
    rows = [line for line in shown.splitlines() if "──" in line]  # the experiments, under the commit
    assert len(rows) == 2 and all("!" not in r for r in rows), shown
    assert "fedavg" in shown and "mm_acc" in shown and "class_acc_0" not in shown
    assert max(len(line) for line in shown.splitlines()) <= 120  # readable in a terminal
    # every experiment carries its metrics (committed with it), not "!"
    exps = [e for row in json.loads(sh(DVC + ["exp", "show", "--json"], repo).stdout)
            for e in (row.get("experiments") or [])]
    accs = {}
    for exp in exps:
        for rev in exp["revs"]:
            data = rev["data"]
            metrics = data["metrics"]["outputs/eval/metrics.json"]["data"]
            accs[data["params"]["params.yaml"]["data"]["algorithm"]["name"]] = metrics["mm_acc"]
    assert set(accs) == {"fedavg", "fedcmi"} and all(isinstance(v, float) for v in accs.values())
    # the per-round curves of both render (rows with equal keys), and the plots page is not committed
    sh(DVC + ["plots", "diff", *[e["revs"][0]["name"] for e in exps], "-o", "dvc_plots"], repo)
    page = (repo / "dvc_plots" / "index.html").read_text()
    assert "Test accuracy per round" in page or "curves.json" in page
    assert sh(["git", "check-ignore", "dvc_plots/index.html"], repo).returncode == 0
    # the offline page: the same comparison with Vega inlined, so it loads nothing from the network
    sh(["fedcmi", "plots-template", "offline.html"], repo)
    sh(DVC + ["plots", "diff", *[e["revs"][0]["name"] for e in exps], "--html-template", "offline.html",
              "-o", "offline_plots"], repo)
    offline = (repo / "offline_plots" / "index.html").read_text()
    assert "window.vegaEmbed=" in offline and "<script src" not in offline.replace(" ", "")
    assert "cdn.jsdelivr" not in offline and offline.count("vegaEmbed('#") >= 2
    assert all(name in offline for name in (e["revs"][0]["name"] for e in exps))


def test_dvc_exp_run_runs_every_method_beyond_fedcmi(repo):
    """Each method of the suite as a DVC experiment (UMT with a teacher stage that fits the tiny budget)."""
    names = ["pmr", "umt", "ume", "mmpareto", "fedavgm", "fedadam", "scaffold"]
    for name in names:
        sh(DVC + ["exp", "run", "-S", f"algorithm.name={name}", "-S", "tracking.enabled=false",
                  "-S", "algorithm.umt.teacher_rounds=1", "-S", "partition.multimodal_fraction=0.5"], repo)
    exps = [e for row in json.loads(sh(DVC + ["exp", "show", "--json"], repo).stdout)
            for e in (row.get("experiments") or [])]
    accs = {}
    for exp in exps:
        data = exp["revs"][0]["data"]
        accs[data["params"]["params.yaml"]["data"]["algorithm"]["name"]] = \
            data["metrics"]["outputs/eval/metrics.json"]["data"]["mm_acc"]
    assert sorted(accs) == sorted(names) and all(0.0 <= v <= 1.0 for v in accs.values()), accs


def test_a_params_typo_stops_dvc_repro_with_one_clear_error(repo):
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["algorithm"]["name"] = "fedvag"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = sh(DVC + ["repro"], repo, check=False)
    assert r.returncode != 0
    assert "algorithm.name" in r.stderr + r.stdout and "fedvag" in r.stderr + r.stdout
    assert not (repo / "data" / "prepared").exists()
