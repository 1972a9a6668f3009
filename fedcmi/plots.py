"""PNG plots of a run: per-round accuracy curves and the confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedcmi.io import write_bytes, write_with
from fedcmi.round.record import RoundRecord


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def run_title(cfg) -> str:
    """What a plot of a run is titled with: the algorithm and the settings one compares runs by."""
    return f"{cfg.algorithm.name}, seed {cfg.seed}, lr {cfg.optim.lr:g}, {cfg.federation.rounds} rounds"


def curves_figure(history: Sequence[RoundRecord], modalities: Sequence[str], title: str = ""):
    """The figure of :func:`round_curves` (rounds on whole-number ticks)."""
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    rows = [(r.round, r.evaluation) for r in history if r.evaluation is not None]
    x = [rnd for rnd, _ in rows]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot(x, [ev.mm_acc for _, ev in rows], label="multimodal", lw=2.2, color="black")
    for m in modalities:
        if any(m in ev.uni_acc for _, ev in rows):
            ax.plot(x, [ev.uni_acc.get(m, float("nan")) for _, ev in rows], label=f"{m} head")
    ax.plot(x, [ev.worst_class_acc for _, ev in rows], label="worst class", ls=":", color="grey")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(title or "accuracy per round")
    fig.tight_layout()
    return fig


def round_curves(history: Sequence[RoundRecord], modalities: Sequence[str], path: Path, title: str = "") -> Path:
    """Multimodal, uni-modal and worst-class accuracy per round, as a PNG."""
    fig = curves_figure(history, modalities, title)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _plt().close(fig)
    return path


def confusion_figure(cm: Sequence[Sequence[int]], class_names: Sequence[str]):
    """Counts beside the row-normalised view (recall per class on the diagonal); digits stay readable on
    dark cells."""
    import numpy as np

    plt = _plt()
    counts = np.asarray(cm, dtype=float)
    k = len(counts)
    rows = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    names = list(class_names) or [str(i) for i in range(k)]
    fig, axes = plt.subplots(1, 2, figsize=(2.0 + 1.4 * k, 1.0 + 0.7 * k))
    for ax, values, fmt, title in ((axes[0], counts, "{:.0f}", "counts"),
                                   (axes[1], rows, "{:.2f}", "share of each actual class")):
        ax.imshow(values, cmap="Blues", vmin=0, vmax=max(float(values.max()), 1e-12))
        dark = values.max() / 2
        for i in range(k):
            for j in range(k):
                ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=8,
                        color="white" if values[i, j] > dark else "black")
        ax.set_xticks(range(k), names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
        ax.set_xlabel("predicted")
        ax.set_ylabel("actual")
        ax.set_title(title, fontsize=9)
    fig.suptitle("multimodal confusion (test)")
    fig.tight_layout()
    return fig


def confusion(cm: Sequence[Sequence[int]], class_names: Sequence[str], path: Path) -> Path:
    fig = confusion_figure(cm, class_names)
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    _plt().close(fig)
    return path


def absent_sweep_plot(path: Path, label: str, candidate: dict[float, float],
                      champion: dict[float, float] | None) -> Path:
    """Accuracy against the share of samples lacking one modality, for a candidate version and the champion
    it was gated against."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, points, style in ((f"candidate {label}", candidate, "o-"), ("champion", champion or {}, "s--")):
        if points:
            ax.plot([100 * r for r in points], list(points.values()), style, label=name)
    ax.set_xlabel("% of samples lacking one modality")
    ax.set_ylabel("accuracy")
    ax.set_title("answers with a modality absent")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return path


def confusion_records(cm: Sequence[Sequence[int]], class_names: Sequence[str]) -> list[dict]:
    """One {actual, predicted} row per test sample, the form `dvc plots` draws a confusion matrix from."""
    names = list(class_names) or [str(i) for i in range(len(cm))]
    return [{"actual": names[i], "predicted": names[j]}
            for i, row in enumerate(cm) for j, n in enumerate(row) for _ in range(int(n))]


#: The Vega-Lite major version whose specs the page renders (DVC's plot templates are Vega-Lite 5).
PAGE_VEGA_LITE = "5.21"
PAGE_TEMPLATE = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
<title>fedcmi plots</title>
<script type="text/javascript">
{bundle}
</script>
<style>body {{ font-family: sans-serif; }} table {{ border-spacing: 15px; }}</style>
</head>
<body>
{{plot_divs}}
</body>
</html>
"""


def write_page_template(path: str | Path) -> Path:
    """An HTML page template that renders Vega-Lite plots with no network: Vega, Vega-Lite and Vega-Embed
    are inlined (bundled by vl-convert), and the plots go where ``{plot_divs}`` stands (the slot that
    ``dvc plots show/diff --html-template`` fills; DVC's own page loads these libraries from a CDN)."""
    try:
        import vl_convert
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the offline plots page needs vl-convert-python: pip install 'fedcmi[plots]'",
                                  name="vl_convert") from None
    # no snippet: the standard bundle (its stub wants a str, the function takes None)
    bundle = vl_convert.javascript_bundle(None, vl_version=PAGE_VEGA_LITE).replace("</script", "<\\/script")  # type: ignore[arg-type]
    page = PAGE_TEMPLATE.format(bundle=bundle).encode("utf-8")
    return write_bytes(Path(path), page)
