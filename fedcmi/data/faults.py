"""Per-sample data faults, as FedMultimodal simulates them (Feng et al., "FedMultimodal: A Benchmark for
Multimodal Federated Learning", KDD 2023): a modality missing from a sample, a wrong label, no label.

Training faults are drawn once, from the seed, when the partition is made (:func:`draw_client_faults`) and
kept in the partition file, so every executor and every method trains on the same faulty data. The
test-time missing modality is drawn per split from the seed (:func:`missing_at_test`). A missing modality
is zero-filled in the input, as FedMultimodal does; the model sees a sample whose one modality says
nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

#: A seed stream of its own: with every rate at 0 the partition is what it was without faults.
FAULT_STREAM = 0xFA17
TEST_STREAM = 0x7E57


@dataclass(frozen=True)
class ClientFaults:
    """One client's faulty samples (global indices into the training split)."""

    missing: Mapping[str, np.ndarray]  # modality -> samples that lack it
    noisy: np.ndarray  # (n, 2): sample, the wrong label it carries
    unlabeled: np.ndarray  # samples without a label

    @classmethod
    def none(cls) -> ClientFaults:
        return cls({}, np.zeros((0, 2), dtype=np.int64), np.zeros(0, dtype=np.int64))

    @property
    def empty(self) -> bool:
        return not any(len(v) for v in self.missing.values()) and not len(self.noisy) and not len(self.unlabeled)

    def counts(self) -> dict[str, int]:
        return {"missing_modality": int(sum(len(v) for v in self.missing.values())),
                "noisy_labels": int(len(self.noisy)), "unlabeled": int(len(self.unlabeled))}


def _pick(rng: np.random.Generator, pool: np.ndarray, rate: float, keep: int = 0) -> np.ndarray:
    """round(rate * len(pool)) samples of ``pool`` (at most len(pool) - keep), sorted."""
    k = min(int(round(rate * len(pool))), max(len(pool) - keep, 0))
    return np.sort(rng.choice(pool, size=k, replace=False)) if k else np.zeros(0, dtype=np.int64)


def draw_client_faults(rng: np.random.Generator, indices: np.ndarray, modalities: Sequence[str],
                       labels: np.ndarray, num_classes: int, missing_modality: float, label_noise: float,
                       missing_labels: float) -> ClientFaults:
    """One client's faults at these rates: a multimodal client's samples lose one of their two modalities
    (which one drawn evenly), labels are replaced by another class drawn evenly, labels go missing (at
    least one labelled sample stays)."""
    missing: dict[str, np.ndarray] = {}
    if len(modalities) == 2:
        lose = _pick(rng, indices, missing_modality)
        which = rng.integers(0, 2, size=len(lose))
        for i, m in enumerate(modalities):
            missing[m] = lose[which == i]
    noisy_idx = _pick(rng, indices, label_noise)
    shift = rng.integers(1, num_classes, size=len(noisy_idx)) if num_classes > 1 else np.zeros(0, np.int64)
    noisy = np.stack([noisy_idx, (labels[noisy_idx].astype(np.int64) + shift) % num_classes], axis=1) \
        if len(noisy_idx) else np.zeros((0, 2), dtype=np.int64)
    unlabeled = _pick(rng, indices, missing_labels, keep=1)
    return ClientFaults(missing, noisy.astype(np.int64), unlabeled.astype(np.int64))


@dataclass(frozen=True)
class SampleFaults:
    """Faults over a whole split, as the batch reader applies them: per modality a mask of the samples
    without it, and the labels the samples carry (noisy where a fault says so)."""

    missing: Mapping[str, np.ndarray]  # modality -> bool mask over the split
    labels: np.ndarray | None  # the split's labels with the noisy ones put in; None: the true labels

    def apply(self, idx: np.ndarray, x: dict[str, torch.Tensor], y: torch.Tensor
              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        for m, mask in self.missing.items():
            if m in x:
                gone = torch.from_numpy(np.ascontiguousarray(mask[idx]))
                if bool(gone.any()):
                    x[m] = x[m].clone()
                    x[m][gone] = 0
        if self.labels is not None:
            y = torch.from_numpy(np.ascontiguousarray(self.labels[idx]))
        return x, y


def split_faults(clients: Sequence[ClientFaults], labels: np.ndarray, modalities: Sequence[str]
                 ) -> SampleFaults | None:
    """The training split's faults from every client's (None when there are none)."""
    if all(c.empty for c in clients):
        return None
    n = len(labels)
    missing = {m: np.zeros(n, dtype=bool) for m in modalities}
    noisy_labels = None
    for c in clients:
        for m, idx in c.missing.items():
            missing[m][idx] = True
        if len(c.noisy):
            if noisy_labels is None:
                noisy_labels = np.array(labels, dtype=np.int64, copy=True)
            noisy_labels[c.noisy[:, 0]] = c.noisy[:, 1]
    return SampleFaults({m: v for m, v in missing.items() if v.any()}, noisy_labels)


def missing_at_test(num_samples: int, modalities: Sequence[str], rate: float, seed: int, split: str
                    ) -> SampleFaults | None:
    """A split's test-time missing modality: round(rate * N) samples, each losing one modality drawn evenly;
    the same samples for every method and round (drawn from the seed and the split's name)."""
    if rate <= 0:
        return None
    rng = np.random.default_rng([seed, TEST_STREAM, *split.encode()])
    lose = _pick(rng, np.arange(num_samples), rate)
    which = rng.integers(0, len(modalities), size=len(lose))
    missing = {}
    for i, m in enumerate(modalities):
        mask = np.zeros(num_samples, dtype=bool)
        mask[lose[which == i]] = True
        missing[m] = mask
    return SampleFaults(missing, None)
