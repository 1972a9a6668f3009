"""Evaluation of a global model on the held-out test set.

Reports what the method file lists: multimodal accuracy and macro-F1, each
uni-modal head, each single-modality path, per-class and worst-class accuracy
with its spread, the imbalance ratio, and the multimodal confusion matrix.
A ridge probe on each frozen encoder measures how much each encoder learned,
independent of the heads on top of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedcmi.data import DataModule
from fedcmi.data.faults import missing_at_test
from fedcmi.models.networks import MultimodalNet


@dataclass
class EvalResult:
    metrics: dict[str, float]
    confusion: list[list[int]]


def confusion_matrix(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def macro_f1(cm: np.ndarray) -> float:
    """Unweighted mean F1 over the classes that occur in the labels or the predictions (scikit-learn's
    ``f1_score(average='macro')``): a class predicted but never true counts, with F1 0."""
    tp = np.diag(cm).astype(float)
    prec = tp / np.maximum(cm.sum(0), 1)
    rec = tp / np.maximum(cm.sum(1), 1)
    f1 = np.where(prec + rec > 0, 2 * prec * rec / np.maximum(prec + rec, 1e-12), 0.0)
    seen = (cm.sum(1) > 0) | (cm.sum(0) > 0)
    return float(f1[seen].mean()) if seen.any() else 0.0


def _metrics_from_logits(logits: dict[str, np.ndarray], y: np.ndarray, k: int, modalities) -> EvalResult:
    out: dict[str, float] = {}
    preds = {name: lg.argmax(1) for name, lg in logits.items()}
    cm = confusion_matrix(preds["mm"], y, k)
    out["mm_acc"] = float((preds["mm"] == y).mean())
    # the share of the most-predicted class: near 1 when the model has collapsed to one answer
    out["pred_top_frac"] = float(cm.sum(axis=0).max() / max(len(y), 1))
    # how much the logits vary with the input, relative to their size: 0 when the network is dead
    mm = logits["mm"].astype(np.float64)
    out["mm_logit_spread"] = (float(mm.std(axis=0).mean() / max(1.0, float(np.abs(mm).mean())))
                              if len(mm) > 1 else 1.0)
    out["mm_f1"] = macro_f1(cm)
    per_class = np.diag(cm) / np.maximum(cm.sum(1), 1)
    present = cm.sum(1) > 0
    for c in range(k):
        out[f"class_acc_{c}"] = float(per_class[c])
    out["worst_class_acc"] = float(per_class[present].min())
    out["class_acc_spread"] = float(per_class[present].max() - per_class[present].min())
    uni = []
    for m in modalities:
        if f"uni/{m}" in preds:
            out[f"uni_acc_{m}"] = float((preds[f"uni/{m}"] == y).mean())
            out[f"path_acc_{m}"] = float((preds[f"path/{m}"] == y).mean())
            uni.append(out[f"uni_acc_{m}"])
    if len(uni) == 2:
        out["imbalance_ratio"] = max(uni) / max(min(uni), 1e-6)
    return EvalResult(out, cm.tolist())


#: The order of a metrics file: the headline and the per-modality figures first, so that a table of runs
#: (`dvc exp show`, `dvc metrics diff`) shows what they are compared by before the per-class detail.
REPORT_ORDER = ("mm_acc", "uni_acc_", "worst_class_acc", "mm_f1", "path_acc_", "probe_acc_", "imbalance_ratio",
                "class_acc_spread", "pred_top_frac", "mm_logit_spread", "class_acc_")


def report_order(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """``metrics`` with keys in :data:`REPORT_ORDER` (classes by number); anything else last, by name."""
    def rank(key: str) -> tuple[int, int, str]:
        for i, prefix in enumerate(REPORT_ORDER):
            if key == prefix or (prefix.endswith("_") and key.startswith(prefix)):
                tail = key[len(prefix):]
                return i, int(tail) if tail.isdigit() else -1, key
        return len(REPORT_ORDER), 0, key

    return {k: metrics[k] for k in sorted(metrics, key=rank)}


@torch.no_grad()
def _collect(model: MultimodalNet, batches, device: torch.device) -> tuple[dict[str, np.ndarray], np.ndarray]:
    chunks: dict[str, list[np.ndarray]] = {}
    ys = []
    for x, y in batches:
        x = {m: v.to(device) for m, v in x.items() if m in model.modalities}
        for name, lg in model.eval_logits(x).items():
            chunks.setdefault(name, []).append(lg.float().cpu().numpy())
        ys.append(y.numpy())
    return {k: np.concatenate(v) for k, v in chunks.items()}, np.concatenate(ys)


@torch.no_grad()
def _features(model: MultimodalNet, batches, m: str, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    feats, ys = [], []
    for x, y in batches:
        feats.append(model.encoders[m](x[m].to(device)).double().cpu().numpy())
        ys.append(y.numpy())
    return np.concatenate(feats), np.concatenate(ys)


def ridge_probe_accuracy(
    train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, k: int, lam: float = 1.0
) -> float:
    """Accuracy of a closed-form ridge classifier on standardised features (deterministic)."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a = np.hstack([(train_x - mu) / sd, np.ones((len(train_x), 1))])
    b = np.hstack([(test_x - mu) / sd, np.ones((len(test_x), 1))])
    target = np.eye(k)[train_y]
    w = np.linalg.solve(a.T @ a + lam * np.eye(a.shape[1]), a.T @ target)
    return float(((b @ w).argmax(1) == test_y).mean())


def evaluate_model(
    model: MultimodalNet, data: DataModule, batch_size: int, device: torch.device, probe: bool = False,
    split: str = "test", missing_modality: float = 0.0, seed: int = 0,
) -> EvalResult:
    """Every metric on ``split`` (the test set by default), with ``missing_modality`` of its samples losing
    one modality (drawn from ``seed``); with ``probe``, also a ridge probe per encoder fitted on the
    training split (always on whole samples)."""
    model.eval()
    faults = missing_at_test(len(data.split(split)), data.spec.modalities, missing_modality, seed, split)
    logits, y = _collect(model, data.split_batches(split, batch_size, faults=faults), device)
    res = _metrics_from_logits(logits, y, data.spec.num_classes, data.spec.modalities)
    if probe:
        for m in model.modalities:
            tx, ty = _features(model, data.split_batches("train", batch_size), m, device)
            ex, ey = _features(model, data.split_batches(split, batch_size), m, device)
            res.metrics[f"probe_acc_{m}"] = ridge_probe_accuracy(tx, ty, ex, ey, data.spec.num_classes)
    return res
