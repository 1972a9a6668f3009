"""The logged MLflow model: a pyfunc that takes a dict of named modality arrays, any of them absent.

``mlflow.pyfunc.load_model`` and ``mlflow models serve`` both run
:class:`ModalityClassifier`: each modality arrives as a batch array in the
prepared data's layout (``uint8`` frames are normalised here, as in
training). A request may leave out any modality but not all: the model then
answers through the path its method provides for the present one (FedCMI's
infiltration path, the fusion head with the absent slot zero-filled, an
ensemble member), the path the evaluation reports as ``path/<m>``. The answer
is a table with the predicted class index and name, one probability column
per class, and the ``path`` that answered with its ``path_kind``. The torch
network stays reachable for research use through
``unwrap_python_model().network``.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import numpy as np
import torch
from mlflow.pyfunc import PythonModel
from torch import nn

from fedcmi.algorithms import build_model
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.data.base import DatasetSpec, _to_tensor
from fedcmi.io import load_state, save_state, write_json
from fedcmi.models.networks import MultimodalNet
from fedcmi.round.update import StateDict

PACKAGE_DIR = Path(__file__).resolve().parent


class Network(nn.Module):
    """A trained network as a classifier: a dict holding one or both modalities -> class logits."""

    def __init__(self, net: MultimodalNet) -> None:
        super().__init__()
        self.net = net
        self.modalities = tuple(net.modalities)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = {m: v for m, v in batch.items() if m in self.modalities}
        return self.net(x).mm_logits

    def path(self, present: Sequence[str]) -> str:
        """The evaluation's name for the view that answers a batch holding ``present``: ``mm`` with every
        modality, ``path/<m>`` with ``m`` alone."""
        held = [m for m in self.modalities if m in present]
        return "mm" if len(held) == len(self.modalities) else "path/" + "+".join(held)


class ModalityClassifier(PythonModel):
    """Batches of named modality arrays -> class index, class name and class probabilities."""

    # No type hints on ``predict``: MLflow would read them as the input schema, which the logged signature
    # already states (a dict of named tensors); this says so, instead of a warning at every import.
    _skip_type_hint_validation = True

    network: Network
    spec: DatasetSpec

    def load_context(self, context: Any) -> None:
        cfg = Config.model_validate(json.loads(Path(context.artifacts["config"]).read_text()))
        self.spec = DatasetSpec.from_json(json.loads(Path(context.artifacts["spec"]).read_text()))
        state, _ = load_state(context.artifacts["weights"], checked=True)
        net = build_model(cfg, self.spec)
        net.load_state_dict(state)
        self.network = Network(net).eval()

    def predict(self, context, model_input, params=None) -> Any:  # no hints: MLflow would read them as a schema
        import pandas as pd

        arrays = check_request(model_input, self.spec)
        arrays = {m: a for m, a in arrays.items() if m in self.network.modalities}
        if not arrays:
            raise ValueError(f"this model reads only {list(self.network.modalities)}, which the request lacks")
        x = {m: _to_tensor(a, self.spec.normalize.get(m)) for m, a in arrays.items()}
        with torch.no_grad():
            probs = torch.softmax(self.network(x).float(), dim=-1).numpy()
        names = class_labels(self.spec)
        out = pd.DataFrame({"class_index": probs.argmax(axis=1).astype(np.int64)})
        out["class_name"] = [names[i] for i in out["class_index"]]
        for i, name in enumerate(names):
            out[f"p_{name}"] = probs[:, i].astype(np.float64)
        path = self.network.path(list(arrays))
        out["path"] = path
        out["path_kind"] = "all modalities" if path == "mm" else self.network.net.absent_modality
        return out


def check_request(model_input: Any, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """The request's arrays, one per modality it holds (at least one), checked before the network sees them:
    numeric, finite, within the modality's dtype, of its sample shape, and all with the same number of
    samples (at least one). ``model_input`` is a dict of batch arrays, or the one-row table MLflow's
    signature check makes of it (a cell per modality, None where absent). A ValueError naming the input and
    what is wrong, never a torch error or an array dump."""
    given = _cells(model_input)
    unknown = sorted(set(given) - set(spec.modalities))
    if unknown:
        raise ValueError(f"the input holds {unknown}, which the model does not take; it takes "
                         f"{list(spec.modalities)}, any of them absent")
    present = [m for m in spec.modalities if given.get(m) is not None]
    if not present:
        raise ValueError(f"the request holds none of the modalities {list(spec.modalities)}; send at least one")
    out: dict[str, np.ndarray] = {}
    for m in present:
        try:
            arr = np.asarray(given[m])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"input {m!r} is not an array ({str(exc)[:80]})") from None
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"input {m!r} holds {arr.dtype} values; it must be numeric ({spec.dtype(m)})")
        if arr.shape[1:] != tuple(spec.shapes[m]):
            raise ValueError(f"input {m!r} has samples of shape {arr.shape[1:]}; the model takes "
                             f"{tuple(spec.shapes[m])} (batch first)")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"input {m!r} holds NaN or Inf")
        out[m] = _as_dtype(m, arr, np.dtype(spec.dtype(m)))
    sizes = {m: len(a) for m, a in out.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the inputs hold different numbers of samples: {sizes}")
    if not next(iter(sizes.values())):
        raise ValueError("the request holds no samples")
    return out


def _cells(model_input: Any) -> dict[str, Any]:
    """The request as {modality: batch}: a dict as given, or the cells of MLflow's one-row table."""
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if model_input.empty:  # what MLflow makes of an empty dict
            return {}
        if len(model_input) != 1:
            raise ValueError(f"the request is a table of {len(model_input)} rows; send one batch per modality "
                             "(a dict of arrays, or JSON {\"inputs\": {\"<modality>\": [...]}})")
        row = model_input.iloc[0]
        return {str(k): (None if _absent(v) else v) for k, v in row.items()}
    if not isinstance(model_input, dict):
        raise ValueError(f"the request is a {type(model_input).__name__}; send a dict of modality arrays")
    return {str(k): v for k, v in model_input.items()}


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _as_dtype(m: str, arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` in the modality's dtype; integers outside that dtype's range (a uint8 frame holding 300) are
    refused rather than wrapped around."""
    if arr.dtype == dtype:
        return arr
    if dtype.kind in "iu":
        if arr.dtype.kind == "f" and not np.array_equal(arr, np.round(arr)):
            raise ValueError(f"input {m!r} holds fractions; it takes whole numbers ({dtype})")
        info = np.iinfo(dtype)
        if arr.size and (arr.min() < info.min or arr.max() > info.max):
            raise ValueError(f"input {m!r} holds values outside {info.min}..{info.max} ({dtype})")
    return arr.astype(dtype)


def class_labels(spec: DatasetSpec) -> list[str]:
    """The classes' names, or their numbers when the data has none."""
    return list(spec.class_names) or [str(i) for i in range(spec.num_classes)]


def signature(spec: DatasetSpec) -> Any:
    """One optional input per modality, a batch of samples in its dtype and shape (any batch size), and the
    prediction table. MLflow's tensor specs cannot be optional, so each input is a column holding a nested
    array, ``required=False``: the signature says that any modality may be left out."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema
    from mlflow.types.schema import Array

    inputs: list[Any] = []
    for m in spec.modalities:
        kind: Any = _column_type(np.dtype(spec.dtype(m)))
        for _ in range(1 + len(spec.shapes[m])):  # the batch axis, then each sample axis
            kind = Array(kind)
        inputs.append(ColSpec(kind, m, required=False))
    outputs = Schema([ColSpec("long", "class_index"), ColSpec("string", "class_name"),
                      *[ColSpec("double", f"p_{n}") for n in class_labels(spec)],
                      ColSpec("string", "path"), ColSpec("string", "path_kind")])
    return ModelSignature(inputs=Schema(inputs), outputs=outputs)


def _column_type(dtype: np.dtype) -> Any:
    """The widest MLflow type of the modality's kind: JSON numbers arrive as float64 and int64, which MLflow's
    check would refuse to narrow; :func:`check_request` narrows them, refusing values that do not fit."""
    from mlflow.types import DataType

    if dtype.kind in "iub":
        return DataType.long
    if dtype.kind == "f":
        return DataType.double
    raise ValueError(f"modality dtype {dtype} has no MLflow column type")


@dataclass
class ModelPackage:
    """What the logged model holds: the settings that build the network, the data spec, the weights and
    an input example (the first test sample)."""

    config: dict
    spec: DatasetSpec
    state: StateDict
    example: dict[str, np.ndarray]

    @classmethod
    def of(cls, cfg: Config, state: StateDict, data: DataModule) -> ModelPackage:
        first = np.arange(1)
        example = {m: np.ascontiguousarray(data.test.features[m][first]) for m in data.spec.modalities}
        return cls(cfg.to_dict(), data.spec, state, example)

    def log(self, name: str = "model") -> str:
        """Log as a pyfunc model of the active MLflow run; returns its URI."""
        with tempfile.TemporaryDirectory(prefix="fedcmi-model-") as tmp:
            root = Path(tmp)
            artifacts = {
                "config": str(write_json(root / "config.json", self.config)),
                "spec": str(write_json(root / "spec.json", self.spec.to_json())),
                "weights": str(save_state(root / "model.safetensors", self.state, {"kind": "global"})),
            }
            # Models from code: the model is this package's serving_model.py, not a pickle. The fedcmi
            # package travels with the model, so it loads where fedcmi is not installed.
            info = mlflow.pyfunc.log_model(
                name=name, python_model=str(PACKAGE_DIR / "serving_model.py"), artifacts=artifacts,
                code_paths=[str(PACKAGE_DIR)], signature=signature(self.spec), input_example=self.example,
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy", "pandas", "safetensors",
                                  "pydantic", "pyyaml", f"mlflow=={mlflow.__version__}"],
            )
        return str(info.model_uri)
