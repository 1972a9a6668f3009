"""Deadlines and over-selection: what a round that does not wait for its slowest client costs in accuracy,
and whom it leaves out.

    python benchmarks/participation.py --jobs 2

The params file's default setting under the seeded latency model (``federation.latency.model: lognormal``,
its default speeds and jitter, every client available), four ways of closing a round, for FedAvg and FedCMI
at the learning rates the fair comparison chose for them, over ``--seeds``:

- wait for all: the round waits for its slowest sampled client (the model is the one without a latency
  model, bit for bit: nobody is late);
- deadline: the round closes at ``--deadline`` simulated seconds; later clients are late;
- over-select: ``--over-selection`` more clients are sampled and the first ``clients_per_round`` to report
  are kept (Bonawitz et al., MLSys 2019);
- both.

Reported per variant: the test figures (mean ± std), the paired difference in mm_acc against waiting for all
(95% CI), the simulated time of the 20 rounds, the share of sampled clients that were late, and that share
among each modality's holders (a deadline that drops one modality's clients more often tilts the model).
Every trial runs through :func:`fedcmi.compare.compare` (cached under ``--work``). Writes
benchmarks/results/participation/results.json, table.md and participation.png.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, save_results

from fedcmi.compare import Method, Plan, compare
from fedcmi.config import load_config
from fedcmi.partition import load_partition

#: each method's settings and its learning rate (BENCHMARKS.md, default setting: chosen on validation)
METHODS = {"FedAvg": ("algorithm.name=fedavg", 0.02), "FedCMI": ("algorithm.name=fedcmi", 0.01)}
FIGURES = ["mm_acc", "path_acc_audio", "path_acc_visual"]
LATENCY = "federation.latency.model=lognormal"


def variants(setting: str, deadline: float, over: float) -> list[Method]:
    return [Method("wait for all", (setting, LATENCY)),
            Method(f"deadline {deadline:g} s", (setting, LATENCY, f"federation.deadline={deadline}")),
            Method(f"over-select {over:.0%}", (setting, LATENCY, f"federation.over_selection={over}")),
            Method(f"over-select {over:.0%}, deadline {deadline:g} s",
                   (setting, LATENCY, f"federation.over_selection={over}", f"federation.deadline={deadline}"))]


def participation(trials: list[dict], holdings: dict[int, list[tuple[str, ...]]], seeds: list[int],
                  modalities: list[str]) -> dict[str, float]:
    """Simulated seconds of the whole run (mean over seeds), the late share of sampled clients, and the late
    share among each modality's sampled holders (over every round of every seed)."""
    seconds, sampled, late = [], 0, 0
    by_mod = {m: [0, 0] for m in modalities}  # late, sampled
    for seed, trial in zip(seeds, trials, strict=True):
        rounds = trial.get("participation", [])
        seconds.append(sum(r["simulated_seconds"] for r in rounds))
        for r in rounds:
            sampled += len(r["sampled"])
            late += len(r["late"])
            for c in r["sampled"]:
                for m in holdings[seed][c]:
                    by_mod[m][1] += 1
                    by_mod[m][0] += c in r["late"]
    out = {"simulated_seconds": statistics.mean(seconds) if seconds else 0.0,
           "late_share": late / sampled if sampled else 0.0}
    out.update({f"late_share_{m}": (a / b if b else 0.0) for m, (a, b) in by_mod.items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--deadline", type=float, default=10.0, help="simulated seconds (the default model's "
                    "sampled clients report at a median of about 6 s)")
    ap.add_argument("--over-selection", type=float, default=0.4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=str(RESULTS / "participation" / "work"))
    ap.add_argument("--out", default=str(RESULTS / "participation"))
    args = ap.parse_args()
    params = load_config(args.params).to_dict()
    params["tracking"]["enabled"] = False
    modalities = list(params["data"]["modalities"])
    rows: dict[str, dict[str, Any]] = {}
    for name in args.methods:
        setting, lr = METHODS[name]
        vs = variants(setting, args.deadline, args.over_selection)
        plan = Plan(vs, vs[0].name, [lr], list(args.seeds), [args.seeds[0]], max_extensions=0, jobs=args.jobs,
                    metric="mm_acc", extra=["federation.workers=1"])

        def progress(line: str, label: str = name) -> None:
            print(f"{label}: {line}", flush=True)

        work = Path(args.work) / name
        outcome = compare(params, plan, work, progress=progress)
        holdings = {s: [c.modalities for c in load_partition(work / f"partition_seed{s}.json").clients]
                    for s in args.seeds}
        for v in vs:
            trials = [outcome.result(v.name, lr, s) for s in args.seeds]
            finals = [{f: x["test"].get(f, x["test"]["mm_acc"]) for f in FIGURES} for x in trials]
            row: dict[str, Any] = {f: (statistics.mean(x[f] for x in finals), statistics.stdev(x[f] for x in finals))
                                   for f in FIGURES}
            row["diverged"] = sum("diverged" in x for x in trials)
            row["vs_wait"] = outcome.versus_baseline(v.name)
            row.update(participation(trials, holdings, list(args.seeds), modalities))
            rows[f"{name}|{v.name}"] = row
    head = ["method", "closing the round", *FIGURES, "Δ mm_acc vs waiting (95% CI)", "simulated time, 20 rounds",
            "late share", *(f"late share, {m} holders" for m in modalities)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        name, variant = key.split("|")
        d = row["vs_wait"]
        delta = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "–"
        cells = [name, variant, *(f"{row[f][0]:.3f} ± {row[f][1]:.3f}" for f in FIGURES), delta,
                 f"{row['simulated_seconds']:.0f} s", f"{row['late_share']:.2f}",
                 *(f"{row[f'late_share_{m}']:.2f}" for m in modalities)]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    plot(rows, args.methods, out / "participation.png")
    save_results(out / "results.json", {"deadline": args.deadline, "over_selection": args.over_selection,
                                        "seeds": args.seeds, "methods": METHODS, "rows": rows})


def plot(rows: dict[str, dict], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    markers = ["o", "s", "^", "D"]  # one per way of closing the round, in the table's order
    for ax, figure, title in zip(axes, ["mm_acc", "path_acc_visual"],
                                 ["multimodal accuracy", "the weak (visual) modality's own path"], strict=True):
        for i, name in enumerate(methods):
            keys = [k for k in rows if k.startswith(name + "|")]
            for j, k in enumerate(keys):
                ax.errorbar(rows[k]["simulated_seconds"] + (i - 0.5) * 3, rows[k][figure][0],
                            yerr=rows[k][figure][1], marker=markers[j % len(markers)], linestyle="none",
                            capsize=3, color=f"C{i}", label=f"{name}: {k.split('|')[1]}")
        ax.set_xlabel("simulated time of the 20 rounds (s)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test, mean ± std over seeds")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
