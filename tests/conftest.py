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


# The tiers: `pytest -m "not slow"` is the quick one (unit and fault tests, in-process); `slow` marks the
# end-to-end tests: whole modules that run dvc, kfp.local, MLflow servers or plug-in packages mark
# themselves (`pytestmark`), and the tests below, which start fedcmi processes or train to the end, are
# marked here so the list of what the quick tier leaves out is in one place.
SLOW = (
    "test_cli.py::", "test_workers.py::", "test_concurrency.py::", "test_threads.py::", "test_damaged_files.py::",
    "test_faults.py::test_kill_9", "test_faults.py::test_a_disk_that_fills", "test_faults.py::test_a_corrupt_file",
    "test_faults.py::test_a_damaged_newest_checkpoint", "test_faults.py::test_a_round_without_enough",
    "test_faults.py::test_a_crafted_pickle_given_to_the_command_line",
    "test_engine.py::test_the_same_state_gives_the_same_bytes_in_every_process",
    "test_divergence.py::test_the_cli_exits_3", "test_errors.py::test_a_new_users_mistakes",
    "test_datasets.py::test_cremad_prepares", "test_datasets.py::test_ave_prepares",
    "test_datasets.py::test_crisismmd_prepares", "test_data.py::test_npz_prepares_and_trains",
)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(s in item.nodeid for s in SLOW):
            item.add_marker(pytest.mark.slow)
