"""An algorithm in one file, from outside this package: registered through the ``fedcmi.algorithms`` entry
point of a package installed beside fedcmi, it trains through `fedcmi train` and the Kubeflow pipeline
(whose steps find it the same way), with its own settings validated and logged like the built-in ones."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY, merge

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

TOY = '''"""A toy algorithm: each client sends the global model moved by `step` along the sign of its local change."""

from pydantic import BaseModel, ConfigDict, Field

from fedcmi.round.update import ClientUpdate
from fedcmi.algorithms.base import ClientContext, Strategy, cross_entropy, local_sgd, snapshot
from fedcmi.models.networks import MultimodalNet


class SignStepOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    step: float = Field(0.01, gt=0)


class SignStep(Strategy):
    name = "signstep"
    Options = SignStepOptions

    def train_client(self, model: MultimodalNet, ctx: ClientContext) -> ClientUpdate:
        start = snapshot(model)
        metrics = local_sgd(model, ctx, cross_entropy)
        step = self.options(SignStepOptions).step
        state = {k: start[k] + step * (v - start[k]).sign() if v.is_floating_point() else v
                 for k, v in snapshot(model).items()}
        return ClientUpdate(ctx.client_id, state, ctx.num_examples, ctx.modalities, metrics)
'''


def _plugin(root: Path) -> Path:
    """The toy as an installed distribution: one module and its dist-info, on a path of its own."""
    root.mkdir(parents=True)
    (root / "toy_signstep.py").write_text(TOY)
    info = root / "toy_signstep-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-signstep\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedcmi.algorithms]\nsignstep = toy_signstep:SignStep\n")
    return root


def _fedcmi(*args: str, cwd: Path, path: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "fedcmi.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=900)


def test_an_algorithm_from_another_package_trains_in_the_engine_and_the_pipeline(tmp_path):
    from mlflow import MlflowClient

    from fedcmi.io import load_state

    plugin = _plugin(tmp_path / "plugin")
    path = f"{plugin}{os.pathsep}{ROOT}"
    project = tmp_path / "project"
    project.mkdir()
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["algorithm"] = {**raw["algorithm"], "name": "signstep", "signstep": {"step": 0.005}}
    raw["tracking"] = {**raw["tracking"], "enabled": True, "experiment": "toy"}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    for step in ("prepare", "partition"):
        assert _fedcmi(step, cwd=project, path=path).returncode == 0

    # its settings are validated like any: one clear message naming the field
    bad = _fedcmi("train", "--set", "algorithm.signstep.step=-1", cwd=project, path=path)
    assert bad.returncode == 2 and "algorithm.signstep.step" in bad.stderr and "Traceback" not in bad.stderr

    r = _fedcmi("train", "--no-progress", cwd=project, path=path)
    assert r.returncode == 0, r.stderr[-3000:]
    history = json.loads((project / "outputs/train/history.json").read_text())
    assert len(history) == TINY["federation"]["rounds"] and "mm_acc" in history[-1]
    client = MlflowClient(f"sqlite:///{project}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("toy").experiment_id])
    assert run.data.params["algorithm.signstep.step"] == "0.005"
    assert "algorithm.fedcmi.beta" not in run.data.params  # another algorithm's section is not this run's

    r = _fedcmi("pipeline", "run-local", "--out", "pipe.safetensors", "--tracking-uri",
                f"sqlite:///{tmp_path}/pipe.db", "--env", f"PYTHONPATH={path}", cwd=project, path=path)
    assert r.returncode == 0, r.stderr[-3000:]
    engine, _ = load_state(project / "outputs/train/model.safetensors")
    pipeline, _ = load_state(project / "pipe.safetensors")
    assert set(engine) == set(pipeline) and all((engine[k] == pipeline[k]).all() for k in engine)


RULE_AND_DATASET = '''"""A toy aggregation rule and a toy dataset, each one class, registered from outside fedcmi."""

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.data.base import DatasetSpec, Split
from fedcmi.datasets.base import Dataset
from fedcmi.rules.base import CoordinateWise


class MidrangeOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(0.5, ge=0, le=1)


class Midrange(CoordinateWise):
    """Each coordinate at ``weight`` between its smallest and largest value."""

    name = "midrange"
    Options = MidrangeOptions

    def middle(self, ordered: torch.Tensor) -> torch.Tensor:
        w = self.options.weight
        return (1 - w) * ordered[:1] + w * ordered[-1:]


class BlobsOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    samples: int = Field(240, ge=20)
    spread: float = Field(1.0, gt=0)


class BlobSource:
    def __init__(self, seed: int, options: BlobsOptions) -> None:
        self.seed, self.options = seed, options

    def generate(self):
        rng = np.random.default_rng(self.seed)
        centres = rng.normal(size=(3, 8)) * 2
        out = {}
        for split, n in (("train", self.options.samples), ("test", self.options.samples // 2)):
            y = rng.integers(0, 3, n)
            feats = {m: (centres[y] + self.options.spread * rng.normal(size=(n, 8))).astype(np.float32)
                     for m in ("left", "right")}
            out[split] = Split(feats, y.astype(np.int64))
        return out

    def spec(self):
        return DatasetSpec(("left", "right"), {"left": (8,), "right": (8,)}, 3, ("a", "b", "c"))


class Blobs(Dataset):
    name = "blobs"
    Options = BlobsOptions
    modalities = ("left", "right")

    @classmethod
    def source(cls, cfg):
        return BlobSource(cfg.seed, cfg.data.options(BlobsOptions))
'''


def test_a_rule_and_a_dataset_from_another_package_run_in_the_engine_and_the_pipeline(tmp_path):
    """One file adds a rule (``fedcmi.rules``) and a dataset (``fedcmi.datasets``); nothing in fedcmi changes."""
    from fedcmi.io import load_state

    root = tmp_path / "plugin"
    root.mkdir()
    (root / "toy_blobs.py").write_text(RULE_AND_DATASET)
    info = root / "toy_blobs-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-blobs\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedcmi.rules]\nmidrange = toy_blobs:Midrange\n\n"
                                           "[fedcmi.datasets]\nblobs = toy_blobs:Blobs\n")
    path = f"{root}{os.pathsep}{ROOT}"
    project = tmp_path / "project"
    project.mkdir()
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    raw["data"] = {**raw["data"], "name": "blobs", "modalities": ["left", "right"], "blobs": {"samples": 200}}
    raw["model"] = {**raw["model"], "encoders": {"left": "mlp", "right": "mlp"}}
    raw["server"] = {**raw["server"], "rule": "midrange", "midrange": {"weight": 0.4}}
    (project / "params.yaml").write_text(yaml.safe_dump(raw))

    bad = _fedcmi("prepare", "--set", "server.midrange.weight=2", cwd=project, path=path)
    assert bad.returncode == 2 and "server.midrange.weight" in bad.stderr and "Traceback" not in bad.stderr
    bad = _fedcmi("prepare", "--set", "data.blobs.spread=0", cwd=project, path=path)
    assert bad.returncode == 2 and "data.blobs.spread" in bad.stderr and "Traceback" not in bad.stderr
    for step in ("prepare", "partition"):
        r = _fedcmi(step, cwd=project, path=path)
        assert r.returncode == 0, r.stderr[-3000:]
    meta = json.loads((project / "data/prepared/meta.json").read_text())
    assert meta["modalities"] == ["left", "right"] and meta["num_classes"] == 3

    r = _fedcmi("train", "--no-progress", "--no-tracking", cwd=project, path=path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert len(json.loads((project / "outputs/train/history.json").read_text())) == TINY["federation"]["rounds"]
    r = _fedcmi("pipeline", "run-local", "--out", "pipe.safetensors", "--tracking-uri", "", "--env",
                f"PYTHONPATH={path}", cwd=project, path=path)
    assert r.returncode == 0, r.stderr[-3000:]
    engine, _ = load_state(project / "outputs/train/model.safetensors")
    pipeline, _ = load_state(project / "pipe.safetensors")
    assert set(engine) == set(pipeline) and all((engine[k] == pipeline[k]).all() for k in engine)
    # the rule really ran: the mean gives another model from the same clients
    r = _fedcmi("train", "--no-progress", "--no-tracking", "--set", "server.rule=mean", "--set",
                "output.dir=mean_out", cwd=project, path=path)
    assert r.returncode == 0, r.stderr[-3000:]
    mean, _ = load_state(project / "mean_out/train/model.safetensors")
    assert any(not torch.equal(mean[k], engine[k]) for k in engine)
