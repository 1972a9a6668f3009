"""Paired two-modality samples and their prepared on-disk form.

A prepared dataset is a folder::

    meta.json                 modalities, shapes, dtypes, classes, sizes, source, preprocessing report
    train/<modality>.npy      one row per sample: float32, uint8 (images) or int64 (token ids)
    train/label.npy           int64
    train/group.npy           int64, optional: the group each sample comes from (a speaker, a hospital),
                              which ``partition.scheme: natural`` makes the clients
    val/...                   optional, the same for a validation split
    test/...                  the same for the test split

The arrays are opened memory-mapped, so a batch reads only its own rows and
epochs never decode source files again. uint8 modalities are turned into
normalised float32 per batch (``DatasetSpec.normalize``), so a cache of
224 x 224 frames takes a quarter of the space float32 would.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedcmi.data.faults import SampleFaults
from fedcmi.errors import FedcmiError
from fedcmi.io import read_json, write_json

SPLITS = ("train", "test")
OPTIONAL_SPLITS = ("val",)
META = "meta.json"
#: the optional per-split array of group ids
GROUP = "group"
FORMAT = "fedcmi-prepared/2"
DTYPES = ("float32", "uint8", "int64")


class DataError(FedcmiError, ValueError):
    """Data that is missing or not in the expected layout."""


@dataclass(frozen=True)
class DatasetSpec:
    """What the models need to know about a dataset.

    ``dtypes`` default to float32. ``normalize[m]`` (for uint8 modalities)
    holds ``scale``, and per-channel ``mean`` and ``std`` over the channel
    axis ``-3``: x -> (x * scale - mean) / std. ``vocab_sizes[m]`` is set for
    token-id modalities (id 0 is padding).
    """

    modalities: tuple[str, str]
    shapes: dict[str, tuple[int, ...]]
    num_classes: int
    class_names: tuple[str, ...] = ()
    dtypes: dict[str, str] = field(default_factory=dict)
    normalize: dict[str, dict] = field(default_factory=dict)
    vocab_sizes: dict[str, int] = field(default_factory=dict)

    def dtype(self, m: str) -> str:
        return self.dtypes.get(m, "float32")

    def to_json(self) -> dict:
        return {
            "modalities": list(self.modalities),
            "shapes": {k: list(v) for k, v in self.shapes.items()},
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "dtypes": {m: self.dtype(m) for m in self.modalities},
            "normalize": dict(self.normalize),
            "vocab_sizes": dict(self.vocab_sizes),
        }

    @classmethod
    def from_json(cls, d: Mapping) -> DatasetSpec:
        return cls(
            modalities=tuple(d["modalities"]),
            shapes={k: tuple(v) for k, v in d["shapes"].items()},
            num_classes=int(d["num_classes"]),
            class_names=tuple(d.get("class_names", ())),
            dtypes=dict(d.get("dtypes", {})),
            normalize=dict(d.get("normalize", {})),
            vocab_sizes={k: int(v) for k, v in d.get("vocab_sizes", {}).items()},
        )


def _to_tensor(arr: np.ndarray, norm: Mapping | None) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(arr))
    if norm is None:
        return x
    x = x.to(torch.float32) * float(norm.get("scale", 1.0))
    if "mean" in norm:
        shape = (-1, 1, 1)  # per channel, on axis -3 of C x H x W or T x C x H x W
        x = (x - torch.tensor(norm["mean"], dtype=torch.float32).view(shape)) / torch.tensor(
            norm["std"], dtype=torch.float32).view(shape)
    return x


@dataclass
class Split:
    """One split: an array per modality (rows aligned) and integer labels."""

    features: dict[str, np.ndarray]
    labels: np.ndarray
    normalize: dict[str, dict] = field(default_factory=dict)
    name: str = ""  # the split's name in the prepared folder, for messages
    #: the group each sample comes from (a speaker, a site), when the data has them
    groups: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.labels)
        for name, arr in self.features.items():
            if len(arr) != n:
                raise DataError(f"modality {name!r} has {len(arr)} rows but there are {n} labels")
        if self.groups is not None and len(self.groups) != n:
            raise DataError(f"{len(self.groups)} group ids but {n} labels")

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx: np.ndarray, modalities: Sequence[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Rows ``idx`` as tensors (uint8 modalities normalised to float32). A NaN or infinite feature is
        an error naming the sample: ``prepare`` refuses them, so one here was written after it."""
        rows = {m: self.features[m][idx] for m in modalities}
        for m, arr in rows.items():
            if arr.dtype.kind == "f" and not np.isfinite(arr).all():
                bad = np.asarray(idx)[~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1)]
                raise DataError(f"sample {int(bad[0])} of the prepared {self.name or 'data'} split holds NaN or "
                                f"infinite {m} features ({len(bad)} such samples in this batch); the data changed "
                                "after `fedcmi prepare` wrote it: rerun `fedcmi prepare`")
        x = {m: _to_tensor(arr, self.normalize.get(m)) for m, arr in rows.items()}
        y = torch.from_numpy(np.ascontiguousarray(self.labels[idx]))
        return x, y


Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


class SplitDataset(torch.utils.data.Dataset):
    """A split's rows as a torch dataset of batches: :meth:`__getitems__` reads a whole batch with one
    fancy index per modality (memory-mapped arrays are read once per batch, not per sample)."""

    def __init__(self, split: Split, modalities: Sequence[str], faults: SampleFaults | None = None) -> None:
        self.split = split
        self.modalities = tuple(modalities)
        self.faults = faults

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int) -> Batch:
        return self.__getitems__([index])

    def __getitems__(self, indices: list[int]) -> Batch:
        idx = np.asarray(indices, dtype=np.int64)
        x, y = self.split.batch(idx, getattr(indices, "modalities", self.modalities))
        return (x, y) if self.faults is None else self.faults.apply(idx, x, y)


class SeededBatches(torch.utils.data.Sampler[list[int]]):
    """``indices`` in a permutation drawn from ``seed`` (as given when None), cut into batches: the order
    depends on the seed alone, not on workers, so every executor feeds the same batches."""

    def __init__(self, indices: np.ndarray, batch_size: int, seed: int | None = None) -> None:
        self.indices = np.asarray(indices, dtype=np.int64)
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self) -> Iterator[list[int]]:
        order = self.indices
        if self.seed is not None:
            order = order[np.random.default_rng(self.seed).permutation(len(order))]
        for start in range(0, len(order), self.batch_size):
            yield order[start : start + self.batch_size].tolist()

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)


class _Request(list):
    """One batch's rows and the modalities to read for them: a resident loader's workers serve clients
    that hold different modalities, so each request says which (it travels to the worker pickled)."""

    modalities: tuple[str, ...] = ()


class ResidentBatches(torch.utils.data.Sampler[list[int]]):
    """The batch sampler of a loader that lives across epochs and clients: each iteration serves the
    request last given to :meth:`serve`, in :class:`SeededBatches`' order."""

    def __init__(self) -> None:
        self._batches = SeededBatches(np.zeros(0, dtype=np.int64), 1)
        self._modalities: tuple[str, ...] = ()

    def serve(self, indices: np.ndarray, batch_size: int, seed: int | None, modalities: Sequence[str]) -> None:
        self._batches = SeededBatches(indices, batch_size, seed)
        self._modalities = tuple(modalities)

    def __iter__(self) -> Iterator[list[int]]:
        for rows in self._batches:
            request = _Request(rows)
            request.modalities = self._modalities
            yield request

    def __len__(self) -> int:
        return len(self._batches)


class ResidentLoader:
    """One loader for every client epoch a process trains. With ``workers`` > 0 its worker processes start
    once and stay (``persistent_workers``), instead of starting again for each client's every epoch; the
    batches are those :func:`batch_loader` gives for the same rows and seed, bitwise (the order is drawn
    in this process, the rows read by whichever worker). One epoch at a time: a new :meth:`batches`
    ends the last one."""

    def __init__(self, split: Split, modalities: Sequence[str], workers: int = 0, pin_memory: bool = False,
                 faults: SampleFaults | None = None) -> None:
        self.sampler = ResidentBatches()
        self.loader = torch.utils.data.DataLoader(
            SplitDataset(split, modalities, faults), batch_sampler=self.sampler, collate_fn=_whole_batch,
            num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)

    def batches(self, indices: np.ndarray, modalities: Sequence[str], batch_size: int,
                seed: int | None) -> Iterator[Batch]:
        """The batches of one client epoch: ``indices`` shuffled by ``seed``, ``modalities`` read."""
        self.sampler.serve(indices, batch_size, seed, modalities)
        return iter(self.loader)


def _whole_batch(batch: Any) -> Any:
    """The collate step of a loader whose dataset already returns whole batches."""
    return batch


def batch_loader(
    split: Split,
    indices: np.ndarray,
    modalities: Sequence[str],
    batch_size: int,
    shuffle_seed: int | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    faults: SampleFaults | None = None,
) -> torch.utils.data.DataLoader:
    """Batches over ``indices`` (shuffled by a seed of their own when given), read by ``workers``
    processes (0: in this one), into pinned memory when asked (for asynchronous copies to a GPU), with
    ``faults`` (missing modalities zero-filled, noisy labels) applied."""
    return torch.utils.data.DataLoader(
        SplitDataset(split, modalities, faults), batch_sampler=SeededBatches(indices, batch_size, shuffle_seed),
        collate_fn=_whole_batch, num_workers=workers, pin_memory=pin_memory)


def _shrink_npy(path: Path, rows: int) -> None:
    """Cut a .npy file to its first ``rows`` rows, in place (the header is rewritten, the file truncated)."""
    fmt = np.lib.format
    with open(path, "r+b") as fh:
        version = fmt.read_magic(fh)
        read, write = ((fmt.read_array_header_1_0, fmt.write_array_header_1_0) if version == (1, 0)
                       else (fmt.read_array_header_2_0, fmt.write_array_header_2_0))
        shape, fortran, dtype = read(fh)
        offset = fh.tell()
        header = {"descr": fmt.dtype_to_descr(dtype), "fortran_order": fortran, "shape": (rows, *shape[1:])}
        fh.seek(0)
        # numpy pads headers so that the first axis can change in place; check, and fall back to a copy if not
        write(fh, header)
        fits = fh.tell() == offset
        if fits:
            fh.truncate(offset + rows * int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize)
    if not fits:
        arr = np.load(path, mmap_mode="r")
        tmp = path.with_suffix(".shrink.npy")
        np.save(tmp, np.ascontiguousarray(arr[:rows]))
        del arr
        tmp.replace(path)


def _reserve(path: Path) -> None:
    """Allocate a new memory-mapped file's blocks now: a full disk is then a clear OSError here, not a
    SIGBUS when a page is first written."""
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        if size and hasattr(os, "posix_fallocate"):
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # a filesystem without it: write as we go
                    raise OSError(exc.errno, f"cannot write {path} ({size / 2**20:.0f} MiB): {exc.strerror}") \
                        from None
    finally:
        os.close(fd)


def _siblings(out_dir: Path) -> tuple[Path, Path]:
    return out_dir.with_name(f".{out_dir.name}.tmp"), out_dir.with_name(f".{out_dir.name}.old")


def check_replaceable(out_dir: Path) -> None:
    """Refuse to write over anything but a prepared-data folder: a missing or empty folder, or one whose
    meta.json says it is fedcmi's prepared data, may be replaced; anything else (a typo pointing at the raw
    data, a home folder, ``/``) is a :class:`DataError`, and nothing in it is touched."""
    out_dir = Path(out_dir)
    if not out_dir.exists() and not out_dir.is_symlink():
        return
    if out_dir.is_symlink() or not out_dir.is_dir():
        raise DataError(f"data.prepared_dir {out_dir} exists and is not a folder; fedcmi replaces only a prepared-data "
                        "folder it wrote: choose another path")
    where = out_dir.resolve()
    if where == Path(where.anchor) or where == Path.cwd().resolve() or where == Path.home().resolve():
        raise DataError(f"data.prepared_dir {out_dir} is {where}, a folder fedcmi must never replace; choose a "
                        "folder of its own, such as data/prepared")
    if not any(out_dir.iterdir()):
        return
    meta_path = out_dir / META
    try:
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    except (OSError, ValueError):
        meta = None
    if not (isinstance(meta, dict) and str(meta.get("format", "")).startswith("fedcmi-prepared/")):
        raise DataError(f"data.prepared_dir {out_dir} exists and holds something other than fedcmi's prepared data "
                        f"(no {META} of format fedcmi-prepared/...); it is left untouched. Choose another path, or "
                        "remove the folder yourself if it is meant to be replaced")


def recover_interrupted_swap(out_dir: Path) -> None:
    """Finish a swap that a crash cut between its two renames: the complete new copy wins, else the old."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        return
    tmp, old = _siblings(out_dir)
    if (tmp / META).is_file():  # meta.json is written last: a folder holding it is complete
        tmp.rename(out_dir)
    elif old.exists():
        old.rename(out_dir)


class PreparedWriter:
    """Writes a prepared dataset row by row into memory-mapped arrays, atomically.

    Open with the most rows each split can have; :meth:`add` appends one
    sample; :meth:`commit` shrinks each split to the rows actually added,
    writes ``meta.json`` and moves the folder into place. The folder appears
    whole or not at all: a failure, or leaving the ``with`` block without
    :meth:`commit`, removes the partial copy and keeps a previous one.
    """

    def __init__(self, out_dir: Path, spec: DatasetSpec, capacity: Mapping[str, int], groups: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.spec = spec
        self.groups = groups
        check_replaceable(self.out_dir)
        recover_interrupted_swap(self.out_dir)
        self.tmp, self.old = _siblings(self.out_dir)
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.count = {s: 0 for s in capacity}
        self.arrays: dict[str, dict[str, np.memmap]] = {}
        for split, cap in capacity.items():
            if split not in SPLITS + OPTIONAL_SPLITS:
                raise ValueError(f"unknown split {split!r}")
            (self.tmp / split).mkdir()
            arrs: dict[str, np.memmap] = {}
            shapes = {**{m: (np.dtype(spec.dtype(m)), (cap, *spec.shapes[m])) for m in spec.modalities},
                      "label": (np.dtype(np.int64), (cap,))}
            if groups:
                shapes[GROUP] = (np.dtype(np.int64), (cap,))
            for name, (dtype, shape) in shapes.items():
                path = self.tmp / split / f"{name}.npy"
                try:
                    arrs[name] = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
                    _reserve(path)
                except BaseException:
                    self.arrays[split] = arrs
                    self.abort()
                    raise
            self.arrays[split] = arrs

    def __enter__(self) -> PreparedWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()

    def add(self, split: str, features: Mapping[str, np.ndarray], label: int, group: int | None = None) -> None:
        i = self.count[split]
        arrs = self.arrays[split]
        for m in self.spec.modalities:
            arrs[m][i] = features[m]
        arrs["label"][i] = label
        if self.groups:
            if group is None:
                raise ValueError(f"sample {i} of split {split} has no group id; every sample needs one")
            arrs[GROUP][i] = group
        self.count[split] = i + 1

    def add_many(self, split: str, features: Mapping[str, np.ndarray], labels: np.ndarray,
                 groups: np.ndarray | None = None) -> None:
        i, n = self.count[split], len(labels)
        arrs = self.arrays[split]
        for m in self.spec.modalities:
            arrs[m][i : i + n] = features[m]
        arrs["label"][i : i + n] = labels
        if self.groups:
            if groups is None:
                raise ValueError(f"split {split} has no group ids; every sample needs one")
            arrs[GROUP][i : i + n] = groups
        self.count[split] = i + n

    def commit(self, source: Mapping, report: Mapping | None = None, extra_files: Mapping | None = None) -> Path:
        for split, arrs in self.arrays.items():
            for name, arr in arrs.items():
                arr.flush()
                cap = len(arr)
                del arr
                if self.count[split] < cap:
                    _shrink_npy(self.tmp / split / f"{name}.npy", self.count[split])
        self.arrays = {}
        meta = {"format": FORMAT, **self.spec.to_json(), "sizes": dict(self.count),
                **({"groups": True} if self.groups else {}), "source": dict(source),
                "report": dict(report or {}), "content_sha256": content_hash(self.tmp),
                "stamps": stamps(self.tmp)}
        for name, content in (extra_files or {}).items():
            write_json(self.tmp / name, content)
        write_json(self.tmp / META, meta)  # last: a folder holding meta.json is complete
        if self.old.exists():
            shutil.rmtree(self.old)
        if self.out_dir.exists():
            self.out_dir.rename(self.old)
        self.tmp.rename(self.out_dir)  # a crash just before this is finished by recover_interrupted_swap
        if self.old.exists():
            shutil.rmtree(self.old)
        return self.out_dir

    def abort(self) -> None:
        self.arrays = {}
        if self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)


def content_hash(folder: Path) -> str:
    """SHA-256 over every array file of a prepared folder, in sorted order with their relative paths: the
    data's own identity, the same wherever it was prepared and whatever versions it (DVC or none)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*.npy")):
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0")
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()


STAMP_BLOCKS = 32
STAMP_BLOCK = 4096


def file_stamp(path: Path) -> dict:
    """A cheap fingerprint of an array file: its size and the SHA-256 of its header and of
    :data:`STAMP_BLOCKS` blocks spread evenly over it (about 130 KiB read, whatever the file's size).

    A rewrite of the data (other values, other sizes, scaled features) changes it; a single edited value
    may fall between the blocks, which is why :meth:`Split.batch` also refuses non-finite features.
    """
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        span = max(size - STAMP_BLOCK, 0)
        for k in range(STAMP_BLOCKS + 1):
            fh.seek(span * k // STAMP_BLOCKS)
            digest.update(fh.read(STAMP_BLOCK))
    return {"bytes": size, "sample_sha256": digest.hexdigest()}


def stamps(folder: Path) -> dict[str, dict]:
    """:func:`file_stamp` of every array file of a prepared folder, by relative path."""
    return {p.relative_to(folder).as_posix(): file_stamp(p) for p in sorted(Path(folder).rglob("*.npy"))}


def check_stamps(folder: Path, meta: Mapping) -> None:
    """Refuse a prepared folder whose arrays are not what ``prepare`` recorded in its meta.json (edited
    by hand, or partly rewritten by another program): the cheap guard every reader runs on opening."""
    recorded = meta.get("stamps")
    if not isinstance(recorded, dict):
        return  # prepared before stamps were recorded: its content hash is checked when registering
    for rel, stamp in sorted(recorded.items()):
        path = Path(folder) / rel
        if not path.is_file():
            raise DataError(f"prepared dataset {folder} lacks {rel}; rerun `fedcmi prepare`")
        now = file_stamp(path)
        if now != stamp:
            what = (f"{now['bytes']:,} bytes where prepare wrote {stamp.get('bytes', 0):,}"
                    if now["bytes"] != stamp.get("bytes") else "its contents differ from what prepare wrote")
            raise DataError(f"{path} changed after `fedcmi prepare` wrote it ({what}): edited by hand or by "
                            "another program; rerun `fedcmi prepare` (or `dvc checkout` the prepared data)")


def write_prepared(out_dir: Path, spec: DatasetSpec, splits: Mapping[str, Split], source: Mapping,
                   report: Mapping | None = None) -> Path:
    """Write in-memory splits as a prepared dataset; the folder appears whole or not at all."""
    grouped = all(s.groups is not None for s in splits.values())
    with PreparedWriter(out_dir, spec, {name: len(s) for name, s in splits.items()}, groups=grouped) as w:
        for name, s in splits.items():
            w.add_many(name, s.features, s.labels, s.groups if grouped else None)
        return w.commit(source, report)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} is damaged ({str(exc).splitlines()[0][:120]}); rerun `fedcmi prepare`") from None


def read_prepared(path: Path) -> tuple[DatasetSpec, dict[str, Split], dict]:
    """Open a prepared dataset memory-mapped; errors name what is missing."""
    path = Path(path)
    recover_interrupted_swap(path)
    meta_path = path / META
    if not meta_path.is_file():
        raise DataError(f"no prepared dataset at {path} (expected {META}); run `fedcmi prepare` first")
    try:
        meta = read_json(meta_path)
    except ValueError as exc:
        raise DataError(f"{exc}; rerun `fedcmi prepare`") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise DataError(f"{meta_path} has format {found!r}, expected {FORMAT!r}; rerun `fedcmi prepare`")
    spec = DatasetSpec.from_json(meta)
    check_stamps(path, meta)
    splits = {}
    sizes = meta.get("sizes", {})
    names = SPLITS + tuple(s for s in OPTIONAL_SPLITS if s in sizes)
    for split_name in names:
        feats = {}
        for m in spec.modalities:
            f = path / split_name / f"{m}.npy"
            if not f.is_file():
                raise DataError(f"prepared dataset {path} lacks {split_name}/{m}.npy")
            feats[m] = _load_npy(f, mmap=True)
            if feats[m].dtype != np.dtype(spec.dtype(m)) or tuple(feats[m].shape[1:]) != spec.shapes[m]:
                raise DataError(f"{f} holds {feats[m].dtype} {feats[m].shape[1:]}, meta.json says "
                                f"{spec.dtype(m)} {spec.shapes[m]}; rerun `fedcmi prepare`")
        label_file = path / split_name / "label.npy"
        if not label_file.is_file():
            raise DataError(f"prepared dataset {path} lacks {split_name}/label.npy")
        labels = _load_npy(label_file, mmap=False)
        if labels.ndim != 1 or labels.dtype != np.int64:
            raise DataError(f"{label_file} holds {labels.dtype} {labels.shape}, expected int64 labels; "
                            "rerun `fedcmi prepare`")
        if len(labels) and (labels.min() < 0 or labels.max() >= spec.num_classes):
            raise DataError(f"{label_file} holds labels {int(labels.min())}..{int(labels.max())}, outside the "
                            f"{spec.num_classes} classes meta.json names; rerun `fedcmi prepare`")
        lengths = {m: len(a) for m, a in feats.items()}
        if any(n != len(labels) for n in lengths.values()):
            raise DataError(f"prepared split {split_name} holds {len(labels)} labels but {lengths} samples; "
                            "rerun `fedcmi prepare`")
        if isinstance(sizes, dict) and sizes.get(split_name, len(labels)) != len(labels):
            raise DataError(f"prepared split {split_name} holds {len(labels)} samples, meta.json says "
                            f"{sizes[split_name]}; rerun `fedcmi prepare`")
        groups = None
        if meta.get("groups"):
            group_file = path / split_name / f"{GROUP}.npy"
            if not group_file.is_file():
                raise DataError(f"prepared dataset {path} lacks {split_name}/{GROUP}.npy (meta.json says it has "
                                "group ids); rerun `fedcmi prepare`")
            groups = _load_npy(group_file, mmap=False)
            if groups.shape != labels.shape or groups.dtype != np.int64:
                raise DataError(f"{group_file} holds {groups.dtype} {groups.shape}, expected one int64 group id "
                                f"per sample ({len(labels)}); rerun `fedcmi prepare`")
        splits[split_name] = Split(feats, labels, {m: spec.normalize[m] for m in spec.normalize}, split_name,
                                   groups)
    return spec, splits, meta
