"""Privacy against utility: multimodal accuracy and the weak modality's own path against epsilon.

    python benchmarks/privacy_utility.py --jobs 2

The params file's default setting with client-level differential privacy (DP-FedAvg; adaptive clipping,
clipped, noised and accounted per modality group; delta 1e-5) at each ``--epsilons`` target, and without
privacy, for FedAvg, FedCMI and UME (the best balanced method of the default-setting tables: the highest
``path_acc_visual``), each at the learning rate the fair comparison chose for it without privacy, over
``--seeds``. The noise a target needs is chosen by the accountant for the run's 20 rounds. Every trial
runs through :func:`fedcmi.compare.compare` (one grid point per method, cached under ``--work``, paired
with the run without privacy on the same seed). Writes benchmarks/results/privacy/results.json, table.md
and privacy_utility.png.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path
from typing import Any

from common import RESULTS, save_results

from fedcmi.algorithms import build_model
from fedcmi.compare import Method, Plan, compare
from fedcmi.config import apply_overrides, config_from_dict, load_config
from fedcmi.data import DataModule
from fedcmi.partition import load_partition
from fedcmi.privacy.accounting import accountant, model_groups

#: each method's settings and its learning rate (BENCHMARKS.md, default setting: chosen on validation)
METHODS = {"FedAvg": ("algorithm.name=fedavg", 0.02), "FedCMI": ("algorithm.name=fedcmi", 0.01),
           "UME": ("algorithm.name=ume", 0.02)}
FIGURES = ["mm_acc", "path_acc_visual", "path_acc_audio", "mm_uar"]
DP = ["privacy.mechanism=central", "privacy.clipping=adaptive", "privacy.noise_multiplier=null"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 16.0, 64.0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=str(RESULTS / "privacy" / "work"))
    ap.add_argument("--out", default=str(RESULTS / "privacy"))
    args = ap.parse_args()
    params = load_config(args.params).to_dict()
    params["tracking"]["enabled"] = False
    rows: dict[str, dict[str, Any]] = {}
    noise: dict[str, dict[str, float]] = {}
    for name in args.methods:
        setting, lr = METHODS[name]
        variants = [Method("no DP", (setting,))] + [
            Method(f"eps {e:g}", (setting, *DP, f"privacy.target_epsilon={e}")) for e in args.epsilons]
        plan = Plan(variants, "no DP", [lr], list(args.seeds), [args.seeds[0]], max_extensions=0, jobs=args.jobs,
                    metric="mm_acc", extra=["federation.workers=1"])
        def progress(line: str, label: str = name) -> None:
            print(f"{label}: {line}", flush=True)

        outcome = compare(params, plan, Path(args.work) / name, progress=progress)
        for v in variants:
            # a trial the divergence guard stopped counts at chance level on every figure (its mm_acc)
            finals = [{f: x.get(f, x["mm_acc"]) for f in FIGURES} for x in outcome.finals(v.name)]
            row: dict[str, Any] = {f: (statistics.mean(x[f] for x in finals), statistics.stdev(x[f] for x in finals))
                                   for f in FIGURES}
            row["diverged"] = sum("diverged" in outcome.result(v.name, lr, s) for s in args.seeds)
            row["vs_no_dp"] = outcome.versus_baseline(v.name)
            rows[f"{name}|{v.name}"] = row
        holdings = [c.modalities for c in load_partition(Path(args.work) / name / "partition_seed0.json").clients]
        for e in args.epsilons:  # the noise each target needed (the seeds share the holdings' kinds and rates)
            trial = config_from_dict(apply_overrides(params, [setting, *DP, f"privacy.target_epsilon={e}"]))
            net = build_model(trial, DataModule(Path(args.work) / name / "prepared_seed0").spec)
            groups = model_groups(trial, net)
            noise.setdefault(name, {})[f"{e:g}"] = accountant(trial, holdings, groups).noise_multiplier
    lines = ["| method | epsilon (delta 1e-5) | noise multiplier | " + " | ".join(FIGURES)
             + " | Δ mm_acc vs no DP (95% CI) | diverged |", "|---|---|---|" + "---|" * (len(FIGURES) + 2)]
    for key, row in rows.items():
        name, variant = key.split("|")
        eps = variant.removeprefix("eps ") if variant != "no DP" else "∞ (no DP)"
        sigma = f"{noise[name][eps]:.3f}" if variant != "no DP" else "0"
        d = row["vs_no_dp"]
        delta = f"{d['mean']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "–"
        lines.append(f"| {name} | {eps} | {sigma} | " + " | ".join(f"{row[f][0]:.3f} ± {row[f][1]:.3f}"
                                                                     for f in FIGURES)
                     + f" | {delta} | {row['diverged']} of {len(args.seeds)} |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    plot(rows, args.epsilons, args.methods, out / "privacy_utility.png")
    save_results(out / "results.json", {"epsilons": args.epsilons, "seeds": args.seeds, "methods": METHODS,
                                        "noise_multipliers": noise, "rows": rows})


def plot(rows: dict[str, dict], epsilons: list[float], methods: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, figure, title in zip(axes, ["mm_acc", "path_acc_visual"],
                                 ["multimodal accuracy", "the weak (visual) modality's own path"], strict=True):
        for i, name in enumerate(methods):
            colour = f"C{i}"
            m = [rows[f"{name}|eps {e:g}"][figure][0] for e in epsilons]
            s = [rows[f"{name}|eps {e:g}"][figure][1] for e in epsilons]
            ax.errorbar(epsilons, m, yerr=s, marker="o", capsize=3, color=colour, label=name)
            ax.axhline(rows[f"{name}|no DP"][figure][0], color=colour, linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("epsilon after 20 rounds (delta 1e-5); dashed: no DP")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test, mean ± std over seeds")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
