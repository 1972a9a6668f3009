"""Evaluation of a global model on a split: its logits through :func:`fedcmi.metrics.from_logits`, and a
ridge probe on each frozen encoder, which measures how much each encoder learned independent of the heads
on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedcmi.data import DataModule
from fedcmi.data.faults import missing_at_test
from fedcmi.metrics import Evaluation, absent_accuracy, from_logits, rate_key
from fedcmi.models.networks import MultimodalNet


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
    split: str = "test", missing_modality: float = 0.0, seed: int = 0, absent_rates: Sequence[float] = (),
) -> Evaluation:
    """Every figure on ``split`` (the test set by default), with ``missing_modality`` of its samples losing
    one modality (zero-filled, drawn from ``seed``); per rate in ``absent_rates``, the accuracy with that
    share of the samples lacking one modality, answered by the other's path (only without zero-filled
    samples, which would be counted twice); with ``probe``, also a ridge probe per encoder fitted on the
    training split (always on whole samples)."""
    model.eval()
    n, mods = len(data.split(split)), data.spec.modalities
    faults = missing_at_test(n, mods, missing_modality, seed, split)
    logits, y = _collect(model, data.split_batches(split, batch_size, faults=faults), device)
    ev = from_logits(logits, y, data.spec.num_classes, mods)
    if faults is None:
        for rate in absent_rates:
            # the samples a zero-filled evaluation at this rate would fault: one draw for both kinds of loss
            lost = missing_at_test(n, mods, rate, seed, split)
            ev.absent_acc[rate_key(rate)] = absent_accuracy(logits, y, mods, lost.missing if lost else {})
    if probe:
        for m in model.modalities:
            tx, ty = _features(model, data.split_batches("train", batch_size), m, device)
            ex, ey = _features(model, data.split_batches(split, batch_size), m, device)
            ev.probe_acc[m] = ridge_probe_accuracy(tx, ty, ex, ey, data.spec.num_classes)
    return ev
