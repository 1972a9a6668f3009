"""Sample-level privacy against utility: DP-SGD inside local training (Opacus's per-example gradients).

    python benchmarks/dp_sgd_utility.py --jobs 2

The params file's default setting with ``privacy.dp_sgd`` at each ``--noise`` multiplier (per-example
clip ``--clip``, Poisson batches of the default batch size, delta 1e-5), and without it, for FedAvg, UME
and FedCMI without its infiltration term (the infiltration couples a client's examples, so DP-SGD refuses
it; what remains is FedCMI's network with its cross-entropy and unimodal terms), each at the learning rate
the fair comparison chose for it, over ``--seeds``. Epsilon is each run's worst client after its 20 rounds
(``dp-accounting``'s RDP accountant over the steps it trained). Every trial runs through
:func:`fedcmi.compare.compare` (cached under ``--work``). Writes benchmarks/results/dp_sgd/results.json,
table.md and dp_sgd_utility.png.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, save_results

from fedcmi.compare import Method, Plan, compare
from fedcmi.config import apply_overrides, config_from_dict, load_config
from fedcmi.partition import load_partition
from fedcmi.privacy.accounting import sample_level_figures
from fedcmi.registry import ALGORITHMS

#: each method's settings and its learning rate (BENCHMARKS.md, default setting: chosen on validation)
METHODS = {"FedAvg": (("algorithm.name=fedavg",), 0.02), "UME": (("algorithm.name=ume",), 0.02),
           "FedCMI (no infiltration)": (("algorithm.name=fedcmi", "algorithm.fedcmi.infiltration=false"), 0.01)}
FIGURES = ["mm_acc", "path_acc_visual", "path_acc_audio"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--noise", type=float, nargs="+", default=[0.6, 1.0, 2.0, 4.0])
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=str(RESULTS / "dp_sgd" / "work"))
    ap.add_argument("--out", default=str(RESULTS / "dp_sgd"))
    args = ap.parse_args()
    params = load_config(args.params).to_dict()
    params["tracking"]["enabled"] = False
    rows: dict[str, dict[str, Any]] = {}
    for name in args.methods:
        setting, lr = METHODS[name]
        dp = ["privacy.dp_sgd.enabled=true", f"privacy.dp_sgd.max_grad_norm={args.clip}"]
        variants = [Method("no DP", setting)] + [
            Method(f"z {z:g}", (*setting, *dp, f"privacy.dp_sgd.noise_multiplier={z}")) for z in args.noise]
        plan = Plan(variants, "no DP", [lr], list(args.seeds), [args.seeds[0]], max_extensions=0, jobs=args.jobs,
                    metric="mm_acc", extra=["federation.workers=1"])

        def progress(line: str, label: str = name) -> None:
            print(f"{label}: {line}", flush=True)

        work = Path(args.work) / name.split()[0]
        outcome = compare(params, plan, work, progress=progress)
        for v in variants:
            trials = [outcome.result(v.name, lr, s) for s in args.seeds]
            finals = [{f: x["test"].get(f, x["test"]["mm_acc"]) for f in FIGURES} for x in trials]
            row: dict[str, Any] = {f: (statistics.mean(x[f] for x in finals), statistics.stdev(x[f] for x in finals))
                                   for f in FIGURES}
            row["diverged"] = sum("diverged" in x for x in trials)
            row["vs_no_dp"] = outcome.versus_baseline(v.name)
            if v.name != "no DP":  # the worst client's epsilon after the last round, over the seeds
                spent = []
                for s in args.seeds:
                    cfg = config_from_dict(apply_overrides(params, [*v.overrides, f"seed={s}"]))
                    part = load_partition(work / f"partition_seed{s}.json")
                    strategy = ALGORITHMS.get(cfg.algorithm.name)(cfg)
                    spent.append(sample_level_figures(cfg, part, strategy.participates,
                                                      cfg.federation.rounds)["dp_sgd_epsilon"])
                row["epsilon"] = max(spent)
            rows[f"{name}|{v.name}"] = row
    lines = ["| method | noise multiplier | epsilon, worst client (delta 1e-5) | " + " | ".join(FIGURES)
             + " | Δ mm_acc vs no DP (95% CI) | diverged |", "|---|---|---|" + "---|" * (len(FIGURES) + 2)]
    for key, row in rows.items():
        name, variant = key.split("|")
        d = row["vs_no_dp"]
        delta = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "–"
        eps = f"{row['epsilon']:.2f}" if "epsilon" in row else "∞ (no DP)"
        lines.append(f"| {name} | {variant.removeprefix('z ') if variant != 'no DP' else '0'} | {eps} | "
                     + " | ".join(f"{row[f][0]:.3f} ± {row[f][1]:.3f}" for f in FIGURES)
                     + f" | {delta} | {row['diverged']} of {len(args.seeds)} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    plot(rows, args.noise, args.methods, out / "dp_sgd_utility.png")
    save_results(out / "results.json", {"noise": args.noise, "clip": args.clip, "seeds": args.seeds,
                                        "methods": METHODS, "rows": rows})


def plot(rows: dict[str, dict], noise: list[float], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, figure, title in zip(axes, ["mm_acc", "path_acc_visual"],
                                 ["multimodal accuracy", "the weak (visual) modality's own path"], strict=True):
        for i, name in enumerate(methods):
            keys = [f"{name}|z {z:g}" for z in noise]
            ax.errorbar([rows[k]["epsilon"] for k in keys], [rows[k][figure][0] for k in keys],
                        yerr=[rows[k][figure][1] for k in keys], marker="o", capsize=3, color=f"C{i}", label=name)
            ax.axhline(rows[f"{name}|no DP"][figure][0], color=f"C{i}", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ticks = sorted({round(rows[f"{methods[0]}|z {z:g}"]["epsilon"], 1) for z in noise})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("worst client's epsilon, 20 rounds (delta 1e-5); dashed: no DP")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test, mean ± std over seeds")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
