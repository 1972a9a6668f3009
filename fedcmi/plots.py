"""PNG plots of a run: per-round accuracy curves and the confusion matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from fedcmi.io import write_with


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def round_curves(history: Sequence[dict], modalities: Sequence[str], path: Path, title: str = "") -> Path:
    """Multimodal, uni-modal and single-path accuracy per round."""
    plt = _plt()
    rows = [r for r in history if "mm_acc" in r]
    x = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [r["mm_acc"] for r in rows], label="multimodal", lw=2.2, color="black")
    for m in modalities:
        if any(f"uni_acc_{m}" in r for r in rows):
            ax.plot(x, [r.get(f"uni_acc_{m}", float("nan")) for r in rows], label=f"{m} head")
    ax.plot(x, [r["worst_class_acc"] for r in rows], label="worst class", ls=":", color="grey")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "accuracy per round")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> Path:
    plt = _plt()
    k = len(cm)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * k, 0.8 + 0.7 * k))
    ax.imshow(cm, cmap="Blues")
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center", fontsize=8)
    names = list(class_names) or [str(i) for i in range(k)]
    ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), names, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual")
    ax.set_title("multimodal confusion (test)")
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def confusion_records(cm: Sequence[Sequence[int]], class_names: Sequence[str]) -> list[dict]:
    """One {actual, predicted} row per test sample, the form `dvc plots` draws a confusion matrix from."""
    names = list(class_names) or [str(i) for i in range(len(cm))]
    return [{"actual": names[i], "predicted": names[j]}
            for i, row in enumerate(cm) for j, n in enumerate(row) for _ in range(int(n))]
