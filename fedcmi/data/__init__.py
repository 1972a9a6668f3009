"""Data: sources, the prepared on-disk form, and the DataModule that serves them.

Lifecycle (after Lightning's DataModule): :func:`prepare` once writes the
prepared folder; :class:`DataModule` opens it and serves client and test
batches. Models never see where the data came from.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcmi.config import Config
from fedcmi.data.base import (
    DataError,
    DatasetSpec,
    ResidentLoader,
    Split,
    batch_loader,
    check_replaceable,
    read_prepared,
    write_prepared,
)
from fedcmi.data.cache import RecordSource, build_cache
from fedcmi.data.faults import SampleFaults
from fedcmi.locks import beside, exclusive, shared
from fedcmi.registry import DATASETS

__all__ = ["DataError", "DatasetSpec", "Split", "DataModule", "prepare", "reading"]


def reading(prepared_dir: str | Path) -> contextlib.AbstractContextManager[None]:
    """Hold the prepared data against a ``prepare`` rewriting it while the block reads it (a training, an
    evaluation, a pipeline step); ``prepare`` meanwhile, or a reader while it writes, is :class:`Busy`."""
    return shared(beside(prepared_dir), f"the prepared data {prepared_dir}")


def prepare(cfg: Config, progress: bool = False) -> dict:
    """Turn the configured source into the prepared folder (whole or not at all); returns a summary."""
    check_replaceable(cfg.data.prepared_dir)  # before the lock (its file goes beside the folder) and any decoding
    with exclusive(beside(cfg.data.prepared_dir), f"the prepared data {cfg.data.prepared_dir}"):
        return _prepare(cfg, progress)


def _prepare(cfg: Config, progress: bool) -> dict:
    t0 = time.perf_counter()
    dataset = DATASETS.get(cfg.data.name)
    source = dataset.source(cfg)
    info: dict[str, Any] = {"name": cfg.data.name, "seed": cfg.seed}
    if isinstance(source, RecordSource):
        return build_cache(source, cfg.data.prepared_dir, cfg.data.workers, cfg.data.max_bad_fraction, info,
                           progress=progress)
    splits = source.generate()
    spec = source.spec()
    info.update(dataset.describe(cfg))
    out = write_prepared(cfg.data.prepared_dir, spec, splits, info)
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    return {
        "path": str(out),
        **{name: len(split) for name, split in splits.items()},
        "num_classes": spec.num_classes,
        "shapes": {k: list(v) for k, v in spec.shapes.items()},
        "bytes": size,
        "seconds": round(time.perf_counter() - t0, 3),
    }


class DataModule:
    """Opens a prepared dataset and serves batches for clients and evaluation."""

    def __init__(self, prepared_dir: str | Path) -> None:
        self.spec, self.splits, self.meta = read_prepared(Path(prepared_dir))

    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    @property
    def val(self) -> Split | None:
        return self.splits.get("val")

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise DataError(f"the prepared data has no {name!r} split (it has {sorted(self.splits)})")
        return self.splits[name]

    def client_loader(self, workers: int = 0, pin_memory: bool = False,
                      faults: SampleFaults | None = None) -> ResidentLoader:
        """One loader over the training split for every client epoch of a process (see
        :class:`~fedcmi.data.base.ResidentLoader`): its workers start once, not per client epoch."""
        return ResidentLoader(self.train, self.spec.modalities, workers, pin_memory, faults)

    def split_batches(self, name: str, batch_size: int, workers: int = 0, pin_memory: bool = False,
                      faults: SampleFaults | None = None) -> Iterable[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """Every sample of split ``name``, in order, with both modalities (and ``faults`` when given)."""
        split = self.split(name)
        return batch_loader(split, np.arange(len(split)), self.spec.modalities, batch_size, None, workers,
                            pin_memory, faults)
