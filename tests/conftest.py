"""Shared fixtures: a tiny synthetic setting that trains in seconds on a CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcmi.config import Config, config_from_dict

TINY = {
    "seed": 3,
    "data": {"synthetic": {"num_train": 160, "num_test": 60, "num_val": 30, "spectrogram": [8, 8], "frames": 1, "frame_size": 8}},
    # The tests' own small protocol: IID, every client multimodal, one local epoch, distillation from round 2.
    "partition": {"num_clients": 4, "min_samples": 4, "scheme": "iid", "max_samples_per_client": None,
                  "multimodal_fraction": 1.0},
    "model": {"embed_dim": 8, "width": 4},
    # Clients train in this process unless a test asks for workers: pytest-xdist already uses every core.
    "federation": {"rounds": 2, "clients_per_round": 2, "batch_size": 16, "local_epochs": 1, "workers": 1},
    "algorithm": {"fedcmi": {"warmup_epochs": None}},
    "evaluation": {"linear_probe": False},
    "tracking": {"enabled": False},
}


def merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_config(tmp: Path, **sections) -> Config:
    """The tiny setting with every path under ``tmp``."""
    raw = merge(TINY, {
        "data": {"prepared_dir": str(tmp / "prepared")},
        "partition": {"file": str(tmp / "partition.json")},
        "output": {"dir": str(tmp / "out")},
    })
    return config_from_dict(merge(raw, sections))


@pytest.fixture
def tiny(tmp_path: Path):
    """A factory: tiny(**overrides) -> prepared and partitioned Config."""
    from fedcmi.data import DataModule, prepare
    from fedcmi.partition import make_partition, save_partition

    def make(**sections) -> Config:
        cfg = tiny_config(tmp_path, **sections)
        prepare(cfg)
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes), cfg.partition.file)
        return cfg

    return make
