"""The logged MLflow model: a pyfunc that takes a dict of named modality arrays.

``mlflow.pyfunc.load_model`` and ``mlflow models serve`` both run
:class:`ModalityClassifier`: each modality arrives as an array in the prepared
data's layout and dtype (``uint8`` frames are normalised here, as in
training), and the answer is a table with the predicted class index and name
and one probability column per class. The torch network stays reachable for
research use through ``unwrap_python_model().network``, which also takes a
dict holding one modality only.
"""

from __future__ import annotations

import json
import tempfile
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
from fedcmi.tracking.inputs import modality_tensor_specs

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
        x = {m: _to_tensor(arrays[m], self.spec.normalize.get(m)) for m in self.spec.modalities}
        with torch.no_grad():
            probs = torch.softmax(self.network(x).float(), dim=-1).numpy()
        names = class_labels(self.spec)
        out = pd.DataFrame({"class_index": probs.argmax(axis=1).astype(np.int64)})
        out["class_name"] = [names[i] for i in out["class_index"]]
        for i, name in enumerate(names):
            out[f"p_{name}"] = probs[:, i].astype(np.float64)
        return out


def check_request(model_input: Any, spec: DatasetSpec) -> dict[str, np.ndarray]:
    """The request's arrays, one per modality, checked before the network sees them: each present, numeric,
    finite, of the modality's sample shape, and every modality with the same number of samples (at least
    one). A ValueError naming the input and what is wrong, never a torch error or an array dump."""
    missing = [m for m in spec.modalities if m not in model_input]
    if missing:
        raise ValueError(f"the input lacks modality {missing}; it needs {list(spec.modalities)}")
    out: dict[str, np.ndarray] = {}
    for m in spec.modalities:
        try:
            arr = np.asarray(model_input[m])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"input {m!r} is not an array ({str(exc)[:80]})") from None
        if arr.dtype.kind not in "biuf":
            raise ValueError(f"input {m!r} holds {arr.dtype} values; it must be numeric ({spec.dtype(m)})")
        if arr.shape[1:] != tuple(spec.shapes[m]):
            raise ValueError(f"input {m!r} has samples of shape {arr.shape[1:]}; the model takes "
                             f"{tuple(spec.shapes[m])} (batch first)")
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            raise ValueError(f"input {m!r} holds NaN or Inf")
        out[m] = arr
    sizes = {m: len(a) for m, a in out.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"the inputs hold different numbers of samples: {sizes}")
    if not next(iter(sizes.values())):
        raise ValueError("the request holds no samples")
    return out


def class_labels(spec: DatasetSpec) -> list[str]:
    """The classes' names, or their numbers when the data has none."""
    return list(spec.class_names) or [str(i) for i in range(spec.num_classes)]


def signature(spec: DatasetSpec) -> Any:
    """Named tensor inputs (one per modality, any batch size) and the prediction table."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = Schema([ColSpec("long", "class_index"), ColSpec("string", "class_name"),
                      *[ColSpec("double", f"p_{n}") for n in class_labels(spec)]])
    return ModelSignature(inputs=Schema(modality_tensor_specs(spec)), outputs=outputs)


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
