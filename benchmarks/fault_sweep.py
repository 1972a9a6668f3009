"""Accuracy against the rate of a data fault, for a few methods, on the default setting.

    python benchmarks/fault_sweep.py --methods FedAvg FedCMI MMPareto --rates 0.3 0.6 --seeds 0 1 2 --jobs 2

Faults (FedMultimodal's, drawn per sample from the seed and kept in the partition file):

- ``missing modality``: that share of the multimodal clients' training samples *and* of the test
  samples lose one of their two modalities (zero-filled);
- ``label noise``: that share of every client's training labels is another class;
- ``missing labels``: that share of every client's training samples has no label (not trained on).

Each method trains at the learning rate ``benchmarks/accuracy.py`` chose for it on validation in the
default setting (read from its ``results.json``); the lr is not tuned again per fault. Rate 0 is that
benchmark's own runs (cached under its work folder), so the curves start from the comparison table.
Writes ``results.json``, ``tables.md`` and ``faults.png`` under ``--out``; runs are cached under
``--out``/work, one folder per fault and rate (with its own partition files).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml
from accuracy import RUNS, data_overrides, run_key, run_one
from common import RESULTS, ROOT, command_line, ensure_data, machine, save_results

from fedcmi.config import load_config
from fedcmi.io import write_text

FAULTS: dict[str, Callable[[float], list[str]]] = {
    "missing modality": lambda r: [f"partition.faults.missing_modality={r}", f"evaluation.missing_modality={r}"],
    "label noise": lambda r: [f"partition.faults.label_noise={r}"],
    "missing labels": lambda r: [f"partition.faults.missing_labels={r}"],
}
SETTING = "default"


def slug(fault: str, rate: float) -> str:
    return f"{fault.replace(' ', '_')}_{rate:g}"


def plot(curves: dict, methods: list[str], rates: list[float], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcmi.io import write_with

    fig, axes = plt.subplots(1, len(FAULTS), figsize=(5.2 * len(FAULTS), 4.2), sharey=True)
    for ax, fault in zip(axes, FAULTS, strict=True):
        for i, name in enumerate(methods):
            xs = [0.0, *rates]
            means = [statistics.mean(curves[fault][name][f"{r:g}"]) for r in xs]
            sds = [statistics.stdev(curves[fault][name][f"{r:g}"]) if len(seeds) > 1 else 0.0 for r in xs]
            ax.errorbar(xs, means, yerr=sds, fmt="-o", ms=4, capsize=3, color=f"C{i}", label=name)
        ax.set_title(fault + (" (train and test)" if fault == "missing modality" else " (train)"), fontsize=9)
        ax.set_xlabel("rate")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"test multimodal accuracy (mean ± std, seeds {seeds})")
    axes[0].legend(fontsize=8)
    fig.suptitle("Default setting; each method at its validation-selected lr from benchmarks/accuracy.py",
                 fontsize=9)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--methods", nargs="+", default=["FedAvg", "FedCMI", "MMPareto"])
    ap.add_argument("--faults", nargs="+", default=list(FAULTS), choices=list(FAULTS))
    ap.add_argument("--rates", type=float, nargs="+", default=[0.3, 0.6])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--accuracy", default=str(RESULTS / "accuracy"),
                    help="the accuracy benchmark's output folder: its selected lrs and its cached rate-0 runs")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one CPU thread each")
    ap.add_argument("--out", default=str(RESULTS / "faults"))
    args = ap.parse_args()
    acc_dir, out = Path(args.accuracy), Path(args.out)
    chosen = json.loads((acc_dir / "results.json").read_text())["selected_lr"].get(SETTING, {})
    missing = [m for m in args.methods if m not in chosen]
    if missing:
        ap.error(f"{acc_dir / 'results.json'} has no selected lr for {missing} in the {SETTING} setting; run "
                 f"benchmarks/accuracy.py --runs FedAvg {' '.join(missing)} first")
    extra = ["federation.workers=1"]
    params = yaml.safe_load(Path(args.params).read_text())
    jobs = []
    for seed in args.seeds:  # rate 0: the accuracy benchmark's own runs
        for name in args.methods:
            jobs.append(((None, 0.0), (params, SETTING, name, chosen[name], seed, tuple(extra), str(acc_dir / "work"))))
    for fault in args.faults:
        for rate in args.rates:
            work = out / "work" / slug(fault, rate)
            for seed in args.seeds:
                shared = f"data.prepared_dir={acc_dir / 'work'}/prepared_{seed}"  # the same data, faulty partitions
                over = [*extra, shared, *FAULTS[fault](rate)]
                ensure_data(load_config(args.params, [*data_overrides(str(work), SETTING, seed), *over]))
                for name in args.methods:
                    jobs.append(((fault, rate), (params, SETTING, name, chosen[name], seed, tuple(over), str(work))))
    t0 = time.perf_counter()
    results: dict = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, ((where, (key, r))) in enumerate(zip([w for w, _ in jobs], pool.map(run_one, [j for _, j in jobs]),
                                                    strict=True)):
            fault, rate = where
            results[(fault, rate, key)] = r
            state = "DIVERGED" if "diverged" in r else f"test {r['test']['mm_acc']:.3f}"
            print(f"[{i + 1}/{len(jobs)} {time.perf_counter() - t0:6.0f}s] {fault or 'none'} {rate:g} {key:46s} "
                  f"{state} ({r['seconds']:.1f}s)", flush=True)
    curves: dict = {f: {n: {} for n in args.methods} for f in args.faults}
    for f in args.faults:
        for n in args.methods:
            for rate in [0.0, *args.rates]:
                src = None if rate == 0.0 else f
                curves[f][n][f"{rate:g}"] = [results[(src, rate, run_key(SETTING, n, chosen[n], s))]["test"]["mm_acc"]
                                             for s in args.seeds]
    md = [f"Default setting, seeds {args.seeds}; test multimodal accuracy, mean ± std; each method at its "
          f"validation-selected lr ({', '.join(f'{n} {chosen[n]:g}' for n in args.methods)}). Command: "
          f"`{command_line()}`\n"]
    for f in args.faults:
        md.append(f"#### {f}\n")
        md.append("| method | " + " | ".join(f"rate {r:g}" for r in [0.0, *args.rates]) + " |")
        md.append("|---|" + "---|" * (len(args.rates) + 1))
        for n in args.methods:
            cells = []
            for r in [0.0, *args.rates]:
                v = curves[f][n][f"{r:g}"]
                cells.append(f"{statistics.mean(v):.3f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.3f}")
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append("")
    text = "\n".join(md)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "tables.md", text)
    plot(curves, args.methods, args.rates, args.seeds, out / "faults.png")
    save_results(out / "results.json", {
        "command": command_line(), "machine": machine(), "methods": args.methods, "runs": {n: RUNS[n] for n in
                                                                                         args.methods},
        "lr": {n: chosen[n] for n in args.methods}, "rates": args.rates, "seeds": args.seeds,
        "faults": {f: FAULTS[f](0.5) for f in args.faults}, "curves": curves,
        "wall_seconds": round(time.perf_counter() - t0, 1)})
    print(text)


if __name__ == "__main__":
    main()
