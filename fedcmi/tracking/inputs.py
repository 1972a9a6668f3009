"""What a run was trained on: the prepared data's hash (its identity), the code's commit, and the data as
the run's MLflow input."""

from __future__ import annotations

import hashlib
import json
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.data.base import META, DatasetSpec, content_hash
from fedcmi.errors import CommandError


def git_commit(cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def data_hash(cfg: Config, verify: bool = False) -> str:
    """The prepared data's identity: the SHA-256 of its arrays, recorded by ``fedcmi prepare`` in its
    meta.json (the same in `dvc repro`, in a pipeline's pods and on any machine); a hash of the meta file
    for a folder prepared before the content hash was recorded.

    ``verify`` hashes the arrays again (what registering does, once): arrays changed by hand since
    ``prepare`` are an error, so versions measured on other data are never compared as equals.
    """
    meta = Path(cfg.data.prepared_dir) / META
    if not meta.is_file():
        return "unknown"
    try:
        content = json.loads(meta.read_text()).get("content_sha256")
    except (ValueError, OSError):
        content = None
    if isinstance(content, str) and content:
        if verify and content_hash(Path(cfg.data.prepared_dir)) != content:
            raise CommandError(f"the prepared data in {cfg.data.prepared_dir} changed after `fedcmi prepare` "
                               "recorded its hash (edited by hand?); rerun `fedcmi prepare` and evaluate again "
                               "before registering")
        return "sha256:" + content[:32]
    return "meta:" + hashlib.sha256(meta.read_bytes()).hexdigest()[:16]


def modality_tensor_specs(spec: DatasetSpec) -> list[Any]:
    """One named tensor per modality, in the prepared data's dtype and shape, any batch size."""
    from mlflow.types import TensorSpec

    return [TensorSpec(np.dtype(spec.dtype(m)), (-1, *spec.shapes[m]), m) for m in spec.modalities]


def dataset_input(cfg: Config, data: DataModule, digest: str) -> Any:
    """The prepared data as an MLflow dataset input (context ``training``): its digest is the data hash
    the run is tagged with (the content hash of its arrays), its schema the modalities' shapes and dtypes."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.types import Schema, TensorSpec

    schema = Schema([*modality_tensor_specs(data.spec), TensorSpec(np.dtype("int64"), (-1,), "label")])
    with warnings.catch_warnings():  # the local-file source is registered twice in MLflow; either fits
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(Path(cfg.data.prepared_dir).resolve()))
    sizes = "-".join(f"{name}{len(split)}" for name, split in sorted(data.splits.items()))
    # MetaDataset's profile is a property MLflow provides; its stubs leave it abstract
    ds = MetaDataset(  # type: ignore[abstract]
        source, name=f"{cfg.data.name}-{sizes}", digest=digest[:36], schema=schema)
    return DatasetInput(ds._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
