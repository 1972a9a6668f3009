"""Accuracy of every algorithm on the default synthetic setting, over several seeds.

    python benchmarks/accuracy.py --seeds 0 1 2 --out benchmarks/results/accuracy_default

Each (run, seed) prepares the data, partitions and trains through the engine
with params.yaml plus the run's overrides. Writes ``results.json`` (every
run's final metrics and per-round history), ``table.md`` (mean and std) and
``curves.png`` (per-round multimodal and weak-modality accuracy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedcmi.config import load_config  # noqa: E402
from fedcmi.data import DataModule, prepare  # noqa: E402
from fedcmi.engine import train  # noqa: E402
from fedcmi.io import write_json, write_text  # noqa: E402
from fedcmi.partition import make_partition, save_partition  # noqa: E402

RUNS: dict[str, list[str]] = {
    "FedAvg": ["algorithm.name=fedavg"],
    "FedProx": ["algorithm.name=fedprox"],
    "FedAvg audio only": ["algorithm.name=unimodal", "algorithm.modality=audio"],
    "FedAvg visual only": ["algorithm.name=unimodal", "algorithm.modality=visual"],
    "OGM-GE": ["algorithm.name=ogm_ge"],
    "FedCMI": ["algorithm.name=fedcmi"],
    "FedCMI w/o infiltration": ["algorithm.name=fedcmi", "algorithm.fedcmi.infiltration=false"],
    "FedCMI w/o class temperature": ["algorithm.name=fedcmi", "algorithm.fedcmi.class_temperature=false"],
    "FedCMI w/o proximal term": ["algorithm.name=fedcmi", "algorithm.mu=0"],
    "FedCMI one projector": ["algorithm.name=fedcmi", "model.projectors=one"],
}
COLUMNS = ["mm_acc", "uni_acc_audio", "uni_acc_visual", "probe_acc_audio", "probe_acc_visual", "worst_class_acc"]


def run_one(params: Path, overrides: list[str], seed: int, work: Path) -> dict:
    base = [f"seed={seed}", f"data.prepared_dir={work}/prepared_{seed}", f"partition.file={work}/partition_{seed}.json",
            f"output.dir={work}/out", "tracking.enabled=false"]
    cfg = load_config(params, base + overrides)
    if not (work / f"prepared_{seed}").exists():
        prepare(cfg)
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes), cfg.partition.file)
    t0 = time.perf_counter()
    res = train(cfg, work / "out" / f"{'_'.join(overrides)}_{seed}", resume="never", progress=False)
    return {"final": res.final, "history": res.history, "seconds": time.perf_counter() - t0}


def table(results: dict, seeds: list[int], command: str) -> str:
    head = "| run | " + " | ".join(COLUMNS) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    rows = []
    for name, per_seed in results.items():
        cells = []
        for col in COLUMNS:
            vals = [r["final"][col] for r in per_seed.values() if col in r["final"]]
            cells.append(f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.3f}"
                         if vals else "–")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    note = f"\nSeeds {seeds}; mean ± std over seeds. Command: `{command}`\n"
    return head + "\n".join(rows) + "\n" + note


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, per_seed in results.items():
        hist = [r["history"] for r in per_seed.values()]
        rounds = [h["round"] for h in hist[0] if "mm_acc" in h]
        for ax, key in zip(axes, ("mm_acc", "uni_acc_visual")):
            if key not in hist[0][-1]:
                continue
            mean = [statistics.mean(h[i][key] for h in hist) for i in range(len(rounds))]
            ax.plot(rounds, mean, label=name)
    axes[0].set_title("multimodal accuracy (test)")
    axes[1].set_title("visual (weak) uni-modal accuracy (test)")
    for ax in axes:
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs", nargs="*", default=list(RUNS), help="which runs (names as in the table)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "accuracy_default"))
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "work"
    command = "python benchmarks/accuracy.py " + " ".join(sys.argv[1:])
    results: dict = {}
    for name in args.runs:
        results[name] = {}
        for seed in args.seeds:
            r = run_one(Path(args.params), RUNS[name] + args.extra, seed, work)
            results[name][seed] = r
            f = r["final"]
            print(f"{name:30s} seed {seed}: mm {f['mm_acc']:.3f} "
                  + " ".join(f"{c} {f[c]:.3f}" for c in COLUMNS[1:] if c in f) + f" ({r['seconds']:.1f}s)", flush=True)
    write_json(out / "results.json", {"command": command, "seeds": args.seeds, "extra": args.extra,
                                      "results": {n: {str(s): r for s, r in v.items()} for n, v in results.items()}})
    md = table(results, args.seeds, command)
    write_text(out / "table.md", md)
    plot(results, out / "curves.png")
    print(md)


if __name__ == "__main__":
    main()
