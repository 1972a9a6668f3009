"""The comparison's report: a Markdown table, three plots and a self-contained HTML page that holds them.

The table gives, per method, its learning-rate grid with the chosen lr, the headline on test (mean ± std
over the seeds), the paired difference to the baseline with its 95% confidence interval and the seeds
ahead, and the figures that show a weak modality (each single-modality path, UAR, macro-F1). The plots:
the headline per round, the validation score against the lr (where each choice sits in its grid), and the
paired differences with their intervals.
"""

from __future__ import annotations

import base64
import html
import statistics
from pathlib import Path

from fedcmi.compare import Outcome
from fedcmi.io import write_text, write_with

EXTRA = ("mm_acc", "mm_uar", "mm_f1", "worst_class_acc")


def _mean_std(vals: list[float]) -> str:
    if not vals:
        return "–"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"


def rows(outcome: Outcome) -> tuple[list[str], list[list[str]]]:
    """The table's header and rows (shared by the Markdown and the HTML)."""
    p = outcome.plan
    finals = {m.name: outcome.finals(m.name) for m in p.methods}
    paths = sorted({k for f in finals.values() for r in f for k in r if k.startswith("path_acc_")})
    extra = [c for c in EXTRA if c != p.metric]
    head = ["method", "lr (grid)", f"{p.metric} (test)", f"Δ vs {p.baseline} (paired) [95% CI]", "ahead",
            *extra, *paths]
    out = []
    for m in p.methods:
        f = finals[m.name]
        grid = ", ".join(f"{g:g}" for g in outcome.grids[m.name])
        edge = " (edge)" if m.name in outcome.out_of_extensions else ""
        cells = [m.name, f"**{outcome.chosen[m.name]:g}**{edge} ({grid})", _mean_std([r[p.metric] for r in f])]
        d = outcome.versus_baseline(m.name)
        cells += (["–", "–"] if d is None else
                  [f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]", f"{d['ahead']}/{d['n']}"])
        cells += [_mean_std([r[c] for r in f if c in r]) for c in (*extra, *paths)]
        out.append(cells)
    return head, out


def markdown(outcome: Outcome, title: str, card: dict[str, str], command: str) -> str:
    p = outcome.plan
    head, body = rows(outcome)
    lines = [f"# {title}", "",
             "Data card: " + "; ".join(f"{k} {v}" for k, v in card.items()), "",
             f"Each method's learning rate chosen on the validation split ({p.metric}, mean of seeds "
             f"{p.select_seeds}), the grid grown past a winning edge up to {p.max_extensions} times; then every "
             f"seed of {p.seeds} at that lr. Test figures: mean ± std over the seeds. Paired: the per-seed "
             f"difference to {p.baseline} (same partition and client sampling), with a 95% t interval. "
             f"{len(outcome.results)} trials, {sum(r['seconds'] for r in outcome.results.values()) / 60:.1f} min "
             f"of training in all ({p.jobs} at a time; this invocation {outcome.wall_seconds / 60:.1f} min).", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    diverged = sorted(k for k, r in outcome.results.items() if "diverged" in r)
    if diverged:
        lines += ["", "Diverged (stopped by the guard, counted at chance): " + ", ".join(diverged)]
    if outcome.out_of_extensions:
        lines += ["", "Chosen at the edge of its grid after every extension (a wider grid may do better): "
                  + ", ".join(outcome.out_of_extensions)]
    lines += ["", "![curves](curves.png)", "", "![learning rates](lr.png)", "", "![paired](paired.png)", "",
              f"Reproduce: `{command}`", ""]
    return "\n".join(lines)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _colour(plt, i: int, n: int):
    """Method ``i`` of ``n``'s colour, the same in every plot: tab10 while it suffices (tab20 pairs
    look-alike shades)."""
    return plt.get_cmap("tab10" if n <= 10 else "tab20")(i % 20)


def _save(fig, path: Path) -> Path:
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    _plt().close(fig)
    return path


def plot_curves(outcome: Outcome, path: Path) -> Path:
    plt = _plt()
    p = outcome.plan
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, m in enumerate(p.methods):
        curves = [outcome.result(m.name, outcome.chosen[m.name], s)["curve"] for s in p.seeds]
        if not all(curves):
            continue
        n = min(len(c) for c in curves)
        rounds = [curves[0][j]["round"] for j in range(n)]
        mean = [statistics.mean(c[j].get(p.metric, float("nan")) for c in curves) for j in range(n)]
        ax.plot(rounds, mean, "-", color=_colour(plt, i, len(p.methods)),
                label=f"{m.name} (lr {outcome.chosen[m.name]:g})")
    ax.set_xlabel("round")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(f"{p.metric} (test), mean of {len(p.seeds)} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_lr(outcome: Outcome, path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, m in enumerate(outcome.plan.methods):
        scores = outcome.val_scores(m.name)
        lrs = sorted(scores)
        color = _colour(plt, i, len(outcome.plan.methods))
        ax.plot(lrs, [scores[lr] for lr in lrs], "-o", ms=3, color=color, label=m.name)
        best = outcome.chosen[m.name]
        ax.scatter([best], [scores[best]], s=70, facecolors="none", edgecolors=[color])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"validation {outcome.plan.metric}")
    ax.set_title("each method's grid; circled: the chosen lr", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def plot_paired(outcome: Outcome, path: Path) -> Path:
    plt = _plt()
    p = outcome.plan
    names = [m.name for m in p.methods if m.name != p.baseline]
    fig, ax = plt.subplots(figsize=(7.5, 0.5 * len(names) + 1.5))
    for y, name in enumerate(names):
        d = outcome.versus_baseline(name)
        assert d is not None
        ax.errorbar([d["mean"]], [y], xerr=[[d["mean"] - d["low"]], [d["high"] - d["mean"]]], fmt="o", capsize=3)
    ax.axvline(0, color="grey", lw=1)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(f"Δ {p.metric} vs {p.baseline}, paired by seed (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def page(outcome: Outcome, title: str, card: dict[str, str], command: str, images: dict[str, Path]) -> str:
    """The report as one HTML file: the plots inlined, so it opens anywhere, offline."""
    head, body = rows(outcome)
    cell = lambda s: html.escape(s).replace("**", "")  # noqa: E731
    table = ("<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in body) + "</table>")
    imgs = "".join(f'<h2>{html.escape(name)}</h2><img alt="{html.escape(name)}" src="data:image/png;base64,'
                   f'{base64.b64encode(path.read_bytes()).decode()}">' for name, path in images.items())
    card_html = "".join(f"<li><b>{html.escape(k)}</b>: {html.escape(v)}</li>" for k, v in card.items())
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;font-size:13px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1><ul>{card_html}</ul>{table}"
            f"{imgs}<p>Reproduce: <code>{html.escape(command)}</code></p></body></html>")


def write_report(outcome: Outcome, folder: Path, title: str, card: dict[str, str], command: str) -> list[Path]:
    """report.md, report.html and the three plots in ``folder``; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    images = {"headline per round": plot_curves(outcome, folder / "curves.png"),
              "learning rates": plot_lr(outcome, folder / "lr.png"),
              "paired differences": plot_paired(outcome, folder / "paired.png")}
    md = write_text(folder / "report.md", markdown(outcome, title, card, command))
    page_file = write_text(folder / "report.html", page(outcome, title, card, command, images))
    return [md, page_file, *images.values()]
