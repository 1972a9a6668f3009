"""What an evaluation reports, as one typed record, and how it is computed from a model's logits.

:class:`Evaluation` is the only place that names the figures: every consumer (the metrics file, the
history and its curves, MLflow, the Kubeflow run, the headline a registry compares) reads its fields and
their :func:`figure` metadata, never key prefixes. A figure added here, with its computation in
:func:`from_logits`, reaches all of them.

The figures follow the method file: multimodal accuracy, macro-F1 and unweighted average recall
(UAR, the published protocols' figure), each uni-modal head, each
single-modality path, per-class and worst-class accuracy with its spread, and the imbalance ratio between
the two uni-modal heads; a ridge probe per frozen encoder is added by :mod:`fedcmi.evaluation`.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np


def figure(rank: int, curve: bool = False, headline: bool = False, per: str = "") -> dict[str, Any]:
    """A figure's metadata: ``rank`` orders metrics files (the headline first, per-class detail last);
    ``curve``: drawn per round; ``headline``: higher is better and a run may be ranked by it; ``per``:
    ``modality`` (a mapping by modality name), ``rate`` (a mapping by a whole percent) or ``class`` (a list
    by class index)."""
    return {"figure": True, "rank": rank, "curve": curve, "headline": headline, "per": per}


@dataclass
class Evaluation:
    """A model's figures on one split."""

    mm_acc: float = field(metadata=figure(0, curve=True, headline=True))
    uni_acc: dict[str, float] = field(default_factory=dict, metadata=figure(1, True, True, per="modality"))
    worst_class_acc: float = field(default=0.0, metadata=figure(2, curve=True, headline=True))
    mm_f1: float = field(default=0.0, metadata=figure(3, curve=True, headline=True))
    #: unweighted average recall (balanced accuracy): the mean per-class recall over the classes present,
    #: the figure FedMultimodal and the emotion-recognition literature report
    mm_uar: float = field(default=0.0, metadata=figure(4, curve=True, headline=True))
    path_acc: dict[str, float] = field(default_factory=dict, metadata=figure(5, True, True, per="modality"))
    #: accuracy when that percent of the samples each lack one modality (drawn evenly, from the seed) and
    #: are answered by the other modality's path, as a served model answers a request without it
    absent_acc: dict[str, float] = field(default_factory=dict, metadata=figure(6, per="rate"))
    probe_acc: dict[str, float] = field(default_factory=dict, metadata=figure(7, headline=True, per="modality"))
    imbalance_ratio: float | None = field(default=None, metadata=figure(8))
    class_acc_spread: float = field(default=0.0, metadata=figure(9))
    #: the share of the most-predicted class: near 1 when the model has collapsed to one answer
    pred_top_frac: float = field(default=0.0, metadata=figure(10))
    #: how much the logits vary with the input, relative to their size: 0 when the network is dead
    mm_logit_spread: float = field(default=1.0, metadata=figure(11))
    class_acc: list[float] = field(default_factory=list, metadata=figure(12, per="class"))
    #: the multimodal confusion matrix (rows: true class); not a figure
    confusion: list[list[int]] = field(default_factory=list, compare=False)

    # -- the flat view: metrics files, history.json, DVC -----------------------------------------------
    def items(self) -> Iterator[tuple[str, float, Mapping[str, Any]]]:
        """(flat name, value, the figure's metadata) of every figure present, in report order."""
        for f in sorted((f for f in fields(self) if f.metadata.get("figure")), key=lambda f: f.metadata["rank"]):
            value = getattr(self, f.name)
            per = f.metadata["per"]
            if per in ("modality", "rate"):
                for m in sorted(value, key=float if per == "rate" else str):
                    yield f"{f.name}_{m}", float(value[m]), f.metadata
            elif per == "class":
                for c, v in enumerate(value):
                    yield f"{f.name}_{c}", float(v), f.metadata
            elif value is not None:
                yield f.name, float(value), f.metadata

    def flat(self) -> dict[str, float]:
        """Every figure under its flat name (``uni_acc_audio``, ``class_acc_3``), in report order."""
        return {name: value for name, value, _ in self.items()}

    def curves(self) -> dict[str, float]:
        """The figures drawn per round."""
        return {name: value for name, value, meta in self.items() if meta["curve"]}

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Evaluation | None:
        """The record back from :meth:`flat`'s names (None when ``flat`` holds no evaluation); names it does
        not know are left to the caller (see :meth:`known`)."""
        if "mm_acc" not in flat:
            return None
        kwargs: dict[str, Any] = {}
        for f in fields(cls):
            if not f.metadata.get("figure"):
                continue
            per = f.metadata["per"]
            if per in ("modality", "rate"):
                pre = f.name + "_"
                kwargs[f.name] = {k[len(pre):]: float(v) for k, v in flat.items()
                                  if k.startswith(pre) and _number(v)}
            elif per == "class":
                pre = f.name + "_"
                found = {int(k[len(pre):]): float(v) for k, v in flat.items()
                         if k.startswith(pre) and k[len(pre):].isdigit() and _number(v)}
                kwargs[f.name] = [found[c] for c in range(len(found))] if set(found) == set(range(len(found))) else []
            elif f.name in flat and _number(flat[f.name]):
                kwargs[f.name] = float(flat[f.name])
        return cls(**kwargs)

    def known(self) -> set[str]:
        """The flat names of this record's figures."""
        return set(self.flat())

    def value(self, name: str) -> float:
        """One figure by its flat name (``mm_acc``, ``path_acc_visual``); KeyError if it has none."""
        return self.flat()[name]


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def headline_names(modalities: tuple[str, ...] | list[str]) -> list[str]:
    """The flat names a run may be ranked by (higher is better), for these modalities."""
    out: list[str] = []
    for f in sorted(fields(Evaluation), key=lambda f: f.metadata.get("rank", 99)):
        if f.metadata.get("headline"):
            out.extend(f"{f.name}_{m}" for m in modalities) if f.metadata["per"] == "modality" else out.append(f.name)
    return out


# -- computation ---------------------------------------------------------------------------------------
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


def from_logits(logits: Mapping[str, np.ndarray], y: np.ndarray, k: int, modalities: tuple[str, ...]) -> Evaluation:
    """The figures from a model's logits on a split: ``mm`` (the multimodal head), and per modality m
    ``uni/m`` (its head) and ``path/m`` (the single-modality path), when the model has them."""
    preds = {name: lg.argmax(1) for name, lg in logits.items()}
    cm = confusion_matrix(preds["mm"], y, k)
    mm = np.asarray(logits["mm"], dtype=np.float64)
    per_class = np.diag(cm) / np.maximum(cm.sum(1), 1)
    present = cm.sum(1) > 0
    ev = Evaluation(
        mm_acc=float((preds["mm"] == y).mean()),
        pred_top_frac=float(cm.sum(axis=0).max() / max(len(y), 1)),
        mm_logit_spread=(float(mm.std(axis=0).mean() / max(1.0, float(np.abs(mm).mean()))) if len(mm) > 1 else 1.0),
        mm_f1=macro_f1(cm),
        mm_uar=float(per_class[present].mean()),
        class_acc=[float(per_class[c]) for c in range(k)],
        worst_class_acc=float(per_class[present].min()),
        class_acc_spread=float(per_class[present].max() - per_class[present].min()),
        confusion=cm.tolist(),
    )
    for m in modalities:
        if f"uni/{m}" in preds:
            ev.uni_acc[m] = float((preds[f"uni/{m}"] == y).mean())
            ev.path_acc[m] = float((preds[f"path/{m}"] == y).mean())
    uni = list(ev.uni_acc.values())
    if len(uni) == 2:
        ev.imbalance_ratio = max(uni) / max(min(uni), 1e-6)
    return ev


def rate_key(rate: float) -> str:
    """A rate's key among :attr:`Evaluation.absent_acc`: its whole percent (0.3 -> ``30``)."""
    return str(round(rate * 100))


def absent_accuracy(logits: Mapping[str, np.ndarray], y: np.ndarray, modalities: tuple[str, ...],
                    lost: Mapping[str, np.ndarray]) -> float:
    """Accuracy when the samples marked in ``lost[m]`` lack modality ``m``: those are answered by the other
    modality's ``path/`` view (what the served model answers without ``m``), the rest by ``mm``. A sample
    whose remaining modality has no path in this model (a single-modality model without it) counts as wrong."""
    pred = logits["mm"].argmax(1)
    right = pred == y
    for m, mask in lost.items():
        others = [o for o in modalities if o != m]
        view = f"path/{others[0]}" if len(others) == 1 else ""
        if view in logits:
            right[mask] = logits[view][mask].argmax(1) == y[mask]
        else:
            right[mask] = False
    return float(right.mean())
