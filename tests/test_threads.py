"""The `threads` setting: it decides torch's intra-op threads, so a process's own default does not change
the model, and it is recorded with the run and part of the checkpoint's identity."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

TRAIN = """
import hashlib, json, sys, torch
sys.path[:0] = [{tests!r}, {root!r}]
torch.set_num_threads(int(sys.argv[1]))          # what this process would use on its own
from pathlib import Path
from conftest import tiny_config
from fedcmi.config import config_from_dict
from fedcmi.runners.engine import train
cfg = tiny_config(Path({tmp!r}))
raw = cfg.to_dict(); raw["threads"] = int(sys.argv[2]); raw["model"]["width"] = 16; raw["model"]["embed_dim"] = 32
cfg = config_from_dict(raw)
res = train(cfg, Path(sys.argv[3]), progress=False)
digest = hashlib.sha256(b"".join(res.state[k].numpy().tobytes() for k in sorted(res.state))).hexdigest()
print(json.dumps({{"digest": digest, "threads": [r.timing.threads for r in res.history]}}))
"""


def _train(tmp: Path, process_threads: int, setting: int, out: str) -> dict:
    code = TRAIN.format(tests=str(ROOT / "tests"), root=str(ROOT), tmp=str(tmp))
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    r = subprocess.run([sys.executable, "-c", code, str(process_threads), str(setting), str(tmp / out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 CPUs to run torch with 2 threads")
def test_the_setting_not_the_process_default_decides_the_model(tiny, tmp_path):
    tiny()  # prepared data and partition in tmp_path
    one = _train(tmp_path, 1, 1, "a")
    many = _train(tmp_path, 2, 1, "b")  # a process whose own default is 2 threads, told to use 1
    assert one["threads"] == many["threads"] == [1, 1]
    assert one["digest"] == many["digest"]
    two = _train(tmp_path, 1, 2, "c")   # the setting at 2: recorded as such
    assert two["threads"] == [2, 2]


def test_threads_is_part_of_the_checkpoint_identity(tiny):
    from fedcmi.data import DataModule
    from fedcmi.round.ledger import run_fingerprint

    cfg = tiny()
    meta = DataModule(cfg.data.prepared_dir).meta
    other = cfg.model_copy(update={"threads": 2})
    assert run_fingerprint(cfg, cfg.partition.file, meta) != run_fingerprint(other, cfg.partition.file, meta)


def test_use_threads(monkeypatch):
    import torch

    from fedcmi.federation import use_threads

    before = torch.get_num_threads()
    try:
        assert use_threads(1) == 1 and torch.get_num_threads() == 1
        assert use_threads(0) == 1  # 0 leaves the count as it is
    finally:
        torch.set_num_threads(before)
