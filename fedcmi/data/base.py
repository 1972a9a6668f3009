"""Paired two-modality samples and their prepared on-disk form.

A prepared dataset is a folder::

    meta.json                 modalities, shapes, classes, sizes, source fingerprint
    train/<modality>.npy      float32, one row per sample
    train/label.npy           int64
    test/...                  the same for the test split

The arrays are opened memory-mapped, so a batch reads only its own rows.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from fedcmi.io import read_json, write_json

SPLITS = ("train", "test")
META = "meta.json"
FORMAT = "fedcmi-prepared/1"


class DataError(ValueError):
    """Data that is missing or not in the expected layout."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the models need to know about a dataset."""

    modalities: tuple[str, str]
    shapes: dict[str, tuple[int, ...]]
    num_classes: int
    class_names: tuple[str, ...] = ()

    def to_json(self) -> dict:
        return {
            "modalities": list(self.modalities),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> "DatasetSpec":
        return cls(
            modalities=tuple(d["modalities"]),  # type: ignore[arg-type]
            shapes={k: tuple(v) for k, v in d["shapes"].items()},
            num_classes=int(d["num_classes"]),
            class_names=tuple(d.get("class_names", ())),
        )


@dataclass
class Split:
    """One split: an array per modality (rows aligned) and integer labels."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    _label_tensor: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name, arr in self.features.items():
            if len(arr) != n:
                raise DataError(f"modality {name!r} has {len(arr)} rows but there are {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray, modalities: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows ``idx`` (sorted for mmap locality is the caller's choice) as tensors."""
        x = {m: torch.from_numpy(np.ascontiguousarray(self.features[m][idx])) for m in modalities}
        y = torch.from_numpy(np.ascontiguousarray(self.labels[idx]))
        return x, y


def iterate_batches(
    split: Split,
    indices: np.ndarray,
    modalities: Sequence[str],
    batch_size: int,
    shuffle_seed: int | None = None,
) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
    """Yield batches over ``indices``; shuffled by a seed of their own when given."""
    order = np.asarray(indices, dtype=np.int64)
    if shuffle_seed is not None:
        order = order[np.random.default_rng(shuffle_seed).permutation(len(order))]
    for start in range(0, len(order), batch_size):
        yield split.batch(order[start : start + batch_size], modalities)


def write_prepared(out_dir: Path, spec: DatasetSpec, splits: Mapping[str, Split], source: Mapping) -> Path:
    """Write a prepared dataset; the folder appears whole or not at all."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        sizes = {}
        for split_name, split in splits.items():
            d = tmp / split_name
            d.mkdir()
            for m in spec.modalities:
                np.save(d / f"{m}.npy", np.ascontiguousarray(split.features[m], dtype=np.float32))
            np.save(d / "label.npy", np.ascontiguousarray(split.labels, dtype=np.int64))
            sizes[split_name] = len(split)
        write_json(tmp / META, {"format": FORMAT, **spec.to_json(), "sizes": sizes, "source": dict(source)})
        old = out_dir.with_name(f".{out_dir.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if out_dir.exists():
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old.exists():
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def read_prepared(path: Path) -> tuple[DatasetSpec, dict[str, Split], dict]:
    """Open a prepared dataset memory-mapped; errors name what is missing."""
    path = Path(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise DataError(f"no prepared dataset at {path} (expected {META}); run `fedcmi prepare` first")
    meta = read_json(meta_path)
    if meta.get("format") != FORMAT:
        raise DataError(f"{meta_path} has format {meta.get('format')!r}, expected {FORMAT!r}")
    spec = DatasetSpec.from_json(meta)
    splits = {}
    for split_name in SPLITS:
        feats = {}
        for m in spec.modalities:
            f = path / split_name / f"{m}.npy"
            if not f.is_file():
                raise DataError(f"prepared dataset {path} lacks {split_name}/{m}.npy")
            feats[m] = np.load(f, mmap_mode="r", allow_pickle=False)
        labels = np.load(path / split_name / "label.npy", allow_pickle=False)
        splits[split_name] = Split(feats, labels)
    return spec, splits, meta
