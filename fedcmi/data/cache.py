"""Decode a file-based dataset once into the prepared, memory-mapped cache.

A :class:`RecordSource` lists its samples as :class:`Record` s (cheap: paths
and labels, read from the split files) and decodes one record at a time.
:func:`build_cache` decodes them in worker processes, in order, writes each
row as it comes, and skips what cannot be read: every skipped sample is
counted and listed with its reason in the report, and above
``max_bad_fraction`` of all samples the run stops with the first reasons.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field, model_validator

from fedcmi.config import Float, Int, Section
from fedcmi.data.base import DataError, DatasetSpec, PreparedWriter
from fedcmi.data.media import MediaError, spectrogram_shape
from fedcmi.data.text import TextError

IMAGENET_NORM = {"scale": 1.0 / 255.0, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


class AudioVisualOptions(Section):
    """Audio to a log spectrogram, frames picked evenly: what CREMA-D and AVE share."""

    sample_rate: Int = Field(16000, ge=1000, le=192000, description="audio is resampled to this rate")
    audio_seconds: Float = Field(3.0, gt=0, le=600, description="audio tiled (short clips) and cut to this length")
    nperseg: Int = Field(512, ge=16, le=8192, description="spectrogram window (scipy.signal.spectrogram)")
    noverlap: Int = Field(353, ge=0, description="spectrogram window overlap; below nperseg")
    frames: Int = Field(1, ge=1, le=64, description="frames per clip, picked evenly from the sorted frame list")
    frame_size: Int = Field(224, ge=8, le=1024, description="frames resized to frame_size x frame_size")
    fps: Int = Field(1, ge=1, le=60, description="frames per second when frames are taken from the videos")
    audio_dir: str = "AudioWAV"
    frames_dir: str = "Image-01-FPS"
    video_dir: str = "VideoFlash"

    @model_validator(mode="after")
    def _overlap(self) -> AudioVisualOptions:
        if self.noverlap >= self.nperseg:
            raise ValueError(f"noverlap ({self.noverlap}) must be below nperseg ({self.nperseg})")
        if int(self.audio_seconds * self.sample_rate) < self.nperseg:
            raise ValueError("audio_seconds * sample_rate must hold at least one spectrogram window (nperseg)")
        return self


def audio_visual_spec(cfg: AudioVisualOptions, classes: tuple[str, ...]) -> DatasetSpec:
    """An audio-visual dataset's spec: a log spectrogram, and uint8 frames normalised as ImageNet's."""
    return DatasetSpec(
        ("audio", "visual"),
        {"audio": spectrogram_shape(cfg.sample_rate, cfg.audio_seconds, cfg.nperseg, cfg.noverlap),
         "visual": (cfg.frames, 3, cfg.frame_size, cfg.frame_size)},
        len(classes), tuple(classes), dtypes={"visual": "uint8"}, normalize={"visual": IMAGENET_NORM})


@dataclass(frozen=True)
class Record:
    """One sample to decode: where its files are, its split and label."""

    split: str
    key: str
    label: int
    fields: dict[str, Any] = field(default_factory=dict)
    #: the group the sample comes from (CREMA-D: its actor), None when the source has none
    group: int | None = None


@dataclass
class Skipped:
    split: str
    key: str
    reason: str


class RecordSource(ABC):
    """A dataset read from files in its distributed layout."""

    layout: str = ""  # the expected layout, for error messages

    @abstractmethod
    def records(self) -> tuple[dict[str, list[Record]], list[Skipped]]:
        """Every split's records in a fixed order, and the rows skipped already (e.g. unknown labels)."""

    @abstractmethod
    def spec(self) -> DatasetSpec:
        """Call after :meth:`records` (a vocabulary may come from the training split)."""

    @abstractmethod
    def decode(self, record: Record) -> dict[str, np.ndarray]:
        """The record's arrays, one per modality; :class:`MediaError` when its files cannot be read."""

    def info(self) -> dict:
        """What identifies the source, stored in meta.json."""
        return {}

    def extra_files(self) -> dict[str, Any]:
        """JSON files to store beside the arrays (file name -> content)."""
        return {}

    def require(self, path: Path, what: str) -> Path:
        if not path.exists():
            raise DataError(f"{what} not found at {path}; expected layout:\n{self.layout}")
        return path


_WORKER_SOURCE: RecordSource | None = None


def _init_worker(source: RecordSource) -> None:
    global _WORKER_SOURCE
    _WORKER_SOURCE = source


def _decode_with(source: RecordSource, record: Record) -> dict[str, np.ndarray] | str:
    try:
        return source.decode(record)
    except (MediaError, TextError) as exc:
        return str(exc)


def _decode_in_worker(record: Record) -> dict[str, np.ndarray] | str:
    assert _WORKER_SOURCE is not None
    return _decode_with(_WORKER_SOURCE, record)


def _workers(requested: int) -> int:
    # The parent copies every decoded sample into the cache, so it keeps a core of its own; on 2 cores two
    # workers measured within 10% of one in-process decoder (benchmarks/prepare_throughput.py).
    return requested or max(1, min((os.cpu_count() or 1) - 1, 8))


def build_cache(source: RecordSource, out_dir: Path, workers: int = 0, max_bad_fraction: float = 0.01,
                source_info: dict | None = None, progress: bool = True) -> dict:
    """Decode every record into ``out_dir``; returns the summary (sizes, skipped and why, bytes, seconds)."""
    t0 = time.perf_counter()
    records, skipped = source.records()
    spec = source.spec()
    total = sum(len(r) for r in records.values()) + len(skipped)
    limit = int(max_bad_fraction * total)

    def check() -> None:
        if len(skipped) > limit:
            first = "; ".join(f"{s.key}: {s.reason}" for s in skipped[:5])
            raise DataError(f"{len(skipped)} of {total} samples could not be used, more than data.max_bad_fraction "
                            f"({max_bad_fraction}) allows; first: {first}")

    check()
    n_workers = _workers(workers)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total - len(skipped), desc="prepare", unit="sample", dynamic_ncols=True)
    # spawn, not fork: the parent may hold torch's thread pools; each worker gets the source once
    pool = (mp.get_context("spawn").Pool(n_workers, initializer=_init_worker, initargs=(source,))
            if n_workers > 1 else None)
    try:
        grouped = any(r.group is not None for recs in records.values() for r in recs)
        with PreparedWriter(out_dir, spec, {s: len(r) for s, r in records.items()}, groups=grouped) as writer:
            for split, recs in records.items():
                results: Iterator = (pool.imap(_decode_in_worker, recs, chunksize=4) if pool
                                     else (_decode_with(source, r) for r in recs))
                for rec, out in zip(recs, results, strict=True):
                    if isinstance(out, str):
                        skipped.append(Skipped(split, rec.key, out))
                        check()
                    else:
                        writer.add(split, out, rec.label, rec.group)
                    if bar is not None:
                        bar.update(1)
            report: dict[str, Any] = {
                "samples": total,
                "kept": dict(writer.count),
                "skipped": len(skipped),
                "skipped_samples": [{"split": s.split, "key": s.key, "reason": s.reason} for s in skipped],
                "seconds": round(time.perf_counter() - t0, 2),
                "workers": n_workers,
            }
            path = writer.commit({**source.info(), **(source_info or {})}, report, source.extra_files())
    finally:
        if pool is not None:
            pool.terminate()
        if bar is not None:
            bar.close()
    size = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return {"path": str(path), **report["kept"], "skipped": len(skipped), "num_classes": spec.num_classes,
            "shapes": {k: list(v) for k, v in spec.shapes.items()}, "bytes": size,
            "seconds": round(time.perf_counter() - t0, 3), "skipped_samples": report["skipped_samples"]}
