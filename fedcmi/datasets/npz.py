"""Bring-your-own data: ``train.npz`` and ``test.npz`` in one folder.

Each file holds one float32 array per modality, named by the modality (first
axis: samples), and an int64 array ``label`` with values in ``0..K-1``. The
modality names come from ``data.modalities``; the encoder for each from
``model.encoders`` (``mlp`` for vectors, ``cnn`` for C x H x W maps, ``clip``
for T x 3 x H x W frames). An optional integer array ``group`` (N) names the group each sample comes from
(a speaker, a site, a device): ``partition.scheme: natural`` makes each group a client. Give it in every
file or in none.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from fedcmi.config import Config
from fedcmi.data.base import SPLITS, DataError, DatasetSpec, Split
from fedcmi.datasets.base import Dataset


class NpzSource:
    """Reads and validates a folder of ``train.npz`` / ``test.npz`` (and ``val.npz``, if there)."""

    def __init__(self, root: Path, modalities: tuple[str, str]) -> None:
        self.root = Path(root)
        self.modalities = modalities

    def _layout(self) -> str:
        arrays = ", ".join(f"{m} (float32, N x ...)" for m in self.modalities)
        return f"{self.root}/train.npz and {self.root}/test.npz, each with arrays {arrays}, label (int64, N)"

    def _load(self, split: str) -> Split:
        path = self.root / f"{split}.npz"
        if not path.is_file():
            raise DataError(f"missing {path}; expected layout: {self._layout()}")
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic not in (b"PK\x03\x04", b"PK\x05\x06"):
            kind = "it is a single .npy array" if magic == b"\x93NUM" else "it is not a zip archive"
            raise DataError(f"{path} is not a readable npz file: {kind}, not a zip of named arrays "
                            f"(np.savez writes one); expected layout: {self._layout()}")
        self._check_members(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                names = set(z.files)
                missing = [k for k in (*self.modalities, "label") if k not in names]
                if missing:
                    raise DataError(f"{path} lacks array(s) {missing}; it holds {sorted(names)}")
                feats = {m: self._array(z, m, path) for m in self.modalities}
                labels = self._array(z, "label", path)
                groups = self._array(z, "group", path) if "group" in names else None
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            if isinstance(exc, DataError):
                raise
            raise DataError(f"{path} is not a readable npz file ({str(exc).splitlines()[0][:120]})") from None
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise DataError(f"{path}: 'label' must be a 1-D integer array, got {labels.dtype} {labels.shape}")
        if len(labels) == 0:
            raise DataError(f"{path} holds no samples")
        out = {}
        for m, arr in feats.items():
            if not np.issubdtype(arr.dtype, np.floating):
                raise DataError(f"{path}: array {m!r} must be floating point, got {arr.dtype}")
            if arr.ndim < 2 or 0 in arr.shape[1:]:
                raise DataError(f"{path}: array {m!r} has shape {arr.shape}; it needs a sample axis and "
                                "non-empty feature axes")
            if len(arr) != len(labels):
                raise DataError(f"{path}: array {m!r} holds {len(arr)} samples, 'label' {len(labels)}")
            if not np.isfinite(arr).all():
                raise DataError(f"{path}: array {m!r} holds NaN or Inf values")
            top = float(np.abs(arr).max()) if arr.size else 0.0
            if top > float(np.finfo(np.float32).max):  # finite in float64, Inf once in the float32 cache
                raise DataError(f"{path}: array {m!r} holds values up to {top:.3g}, beyond float32's range "
                                "(about 3.4e38); scale the features")
            out[m] = arr.astype(np.float32, copy=False)
        if groups is not None:
            if groups.shape != labels.shape or not np.issubdtype(groups.dtype, np.integer):
                raise DataError(f"{path}: 'group' must be a 1-D integer array with one id per sample "
                                f"({len(labels)}), got {groups.dtype} {groups.shape}")
            groups = groups.astype(np.int64)
        return Split(out, labels.astype(np.int64), groups=groups)

    def _check_members(self, path: Path) -> None:
        """Every member the reader will take, checked from its header before anything is allocated: a numpy
        array (not a pickle, not raw bytes), named once, no larger than the bytes it holds."""
        try:
            with zipfile.ZipFile(path) as zf:
                infos = zf.infolist()
                names = [i.filename for i in infos]
                twice = sorted({n for n in names if names.count(n) > 1})
                if twice:
                    raise DataError(f"{path} holds members named twice ({twice[:3]}): which one is meant is "
                                    "ambiguous; write the file again with np.savez")
                wanted = {f"{k}.npy" for k in (*self.modalities, "label", "group")}
                for info in infos:
                    if info.filename not in wanted:
                        continue
                    with zf.open(info) as fh:
                        try:
                            version = np.lib.format.read_magic(fh)
                        except ValueError:
                            raise DataError(f"{path}: member {info.filename} is not a numpy array (raw bytes "
                                            "or a pickle); fedcmi reads only numeric arrays") from None
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        try:
                            shape, _, dtype = read_header(fh, max_header_size=10_000)
                        except ValueError as exc:
                            raise DataError(f"{path}: member {info.filename} has a damaged header "
                                            f"({str(exc)[:100]})") from None
                    if dtype.hasobject:
                        raise DataError(f"{path}: array {info.filename[:-4]!r} holds Python objects (a pickle); "
                                        "fedcmi reads only numeric arrays and never unpickles a file")
                    need = int(np.prod(shape, dtype=object)) * dtype.itemsize
                    if need > info.file_size:
                        raise DataError(f"{path}: array {info.filename[:-4]!r} declares shape {tuple(shape)} "
                                        f"{dtype} ({need:,} bytes) but holds {info.file_size:,}: damaged")
        except zipfile.BadZipFile as exc:
            raise DataError(f"{path} is not a readable npz file ({exc})") from None

    @staticmethod
    def _array(z, name: str, path: Path) -> np.ndarray:
        try:
            return z[name]
        except ValueError as exc:
            if "pickle" in str(exc).lower():
                raise DataError(f"{path}: array {name!r} holds Python objects (a pickle); fedcmi reads only "
                                "numeric arrays and never unpickles a file") from None
            raise

    def generate(self) -> dict[str, Split]:
        if not self.root.is_dir():
            raise DataError(f"data.path {self.root} is not a folder; expected layout: {self._layout()}")
        splits = {s: self._load(s) for s in SPLITS}
        if (self.root / "val.npz").is_file():  # optional: a validation split for choosing settings
            splits["val"] = self._load("val")
        grouped = {name for name, split in splits.items() if split.groups is not None}
        if grouped and grouped != set(splits):
            raise DataError(f"{sorted(grouped)} hold a 'group' array and {sorted(set(splits) - grouped)} do not: "
                            "give every file one, or none")
        for name, split in splits.items():
            for m in self.modalities:
                a, b = splits["train"].features[m].shape[1:], split.features[m].shape[1:]
                if a != b:
                    raise DataError(f"modality {m!r} has shape {a} in train.npz but {b} in {name}.npz")
            if len(split) and split.labels.min() < 0:
                raise DataError(f"{name}.npz: labels must be non-negative class indices")
        classes = np.unique(splits["train"].labels)
        k = int(classes[-1]) + 1
        if len(classes) < 2:
            raise DataError(f"train.npz holds one class ({int(classes[0])}): a classifier needs at least two")
        if len(classes) != k:
            gaps = [int(c) for c in np.setdiff1d(np.arange(min(k, 10**6)), classes)[:5]]
            raise DataError(f"train.npz labels must be 0..K-1 with every class present: the largest is {k - 1}, "
                            f"but {k - len(classes)} class(es) never occur, such as {gaps}")
        seen = set(classes.tolist())
        for name in ("test", "val"):
            unseen = sorted(set(np.unique(splits[name].labels).tolist()) - seen) if name in splits else []
            if unseen:
                raise DataError(f"{name} labels {unseen} never occur in train.npz")
        self._spec = DatasetSpec(
            self.modalities,
            {m: tuple(splits["train"].features[m].shape[1:]) for m in self.modalities},
            k,
            tuple(f"class_{i}" for i in range(k)),
        )
        return splits

    def spec(self) -> DatasetSpec:
        if not hasattr(self, "_spec"):
            self.generate()
        return self._spec


class Npz(Dataset):
    """Bring your own: ``train.npz`` / ``test.npz`` (and ``val.npz``) in ``data.path``, modalities named by
    ``data.modalities``."""

    name = "npz"

    @classmethod
    def source(cls, cfg: Config) -> NpzSource:
        return NpzSource(cfg.data.path, cfg.data.modalities)
