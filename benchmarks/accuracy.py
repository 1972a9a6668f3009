"""Accuracy of every algorithm and ablation on the synthetic data, under three partitions.

    python benchmarks/accuracy.py --jobs 2

For each partition setting (IID; Dirichlet alpha=1 label skew; modality
heterogeneity with half the clients multimodal), each run (FedAvg, FedProx,
single-modality FedAvg, OGM-GE, FedCMI and its ablations), each learning rate
of ``--lrs`` and each seed, trains through the engine with ``params.yaml``
plus the run's overrides, then evaluates the final global model on the
validation split and the test split.

Two tables per setting: at the shared default learning rate (``optim.lr`` of
params.yaml, the same for every method), and at each method's own best
learning rate from the grid, chosen by mean *validation* multimodal accuracy
over the seeds (the test split never chooses anything). Writes
``results.json`` (every run: final test and validation metrics, per-round
history), ``tables.md`` and ``curves_<setting>.png`` under ``--out``. Finished
runs are cached under ``--out``/work, so an interrupted benchmark resumes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from common import RESULTS, ROOT, ensure_data, save_results

import torch
import yaml

# Imported before the pool forks its workers, so a benchmark that runs for an hour keeps the code it started with.
from fedcmi.config import apply_overrides, config_from_dict, load_config
from fedcmi.engine import train
from fedcmi.federation import Federation
from fedcmi.io import write_json, write_text
from fedcmi.partition import load_partition

SETTINGS: dict[str, list[str]] = {
    "iid": [],
    "dirichlet": ["partition.scheme=dirichlet", "partition.alpha=1.0"],
    "hetero": ["partition.multimodal_fraction=0.5"],
}
SETTING_TITLES = {
    "iid": "IID, all clients multimodal (the default setting)",
    "dirichlet": "Dirichlet(alpha=1) label skew, all clients multimodal",
    "hetero": "modality heterogeneity: half the clients multimodal, a quarter audio only, a quarter visual only",
}
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


def run_key(setting: str, name: str, lr: float, seed: int) -> str:
    return f"{setting}|{name}|lr={lr:g}|seed={seed}"


def run_one(job: tuple) -> tuple[str, dict]:
    """One (setting, run, lr, seed): train, then evaluate on val and test. Cached under work/."""
    params, setting, name, lr, seed, extra, work = job
    torch.set_num_threads(1)  # one core per job; --jobs sets how many run at once
    key = run_key(setting, name, lr, seed)
    cache = Path(work) / "runs" / (key.replace("|", "__").replace(" ", "_").replace("/", "-") + ".json")
    if cache.is_file():
        return key, json.loads(cache.read_text())
    base = [f"seed={seed}", f"data.prepared_dir={work}/prepared_{seed}",
            f"partition.file={work}/partition_{setting}_{seed}.json", f"output.dir={work}/out",
            "tracking.enabled=false", f"optim.lr={lr}"]
    cfg = config_from_dict(apply_overrides(params, base + SETTINGS[setting] + RUNS[name] + list(extra)))
    dm = ensure_data(cfg)
    t0 = time.perf_counter()
    res = train(cfg, Path(work) / "out" / cache.stem, resume="never", progress=False)
    seconds = time.perf_counter() - t0
    fed = Federation(cfg, dm, load_partition(cfg.partition.file))
    val = fed.evaluate(res.state, split="val").metrics
    out = {"test": res.final, "val": val, "history": res.history, "seconds": seconds}
    write_json(cache, out)
    return key, out


CURVE_KEYS = ("round", "mm_acc", "uni_acc_audio", "uni_acc_visual", "worst_class_acc", "imbalance_ratio",
              "dominant_frac_audio", "train_loss")


def compact(r: dict) -> dict:
    """A run without per-class figures, and its history cut to the curves' keys (the cache keeps it all)."""
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("class_acc_")}  # noqa: E731
    return {"test": keep(r["test"]), "val": keep(r["val"]), "seconds": round(r["seconds"], 2),
            "history": [{k: h[k] for k in CURVE_KEYS if k in h} for h in r["history"]]}


def mean_std(vals: list[float]) -> str:
    if not vals:
        return "–"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"


def select_lr(results: dict, setting: str, name: str, lrs: list[float], seeds: list[int]) -> float:
    """The learning rate with the best mean validation multimodal accuracy (ties: the smaller lr)."""
    scores = {lr: statistics.mean(results[run_key(setting, name, lr, s)]["val"]["mm_acc"] for s in seeds)
              for lr in lrs}
    return max(sorted(lrs), key=lambda lr: scores[lr])


def table(results: dict, setting: str, lr_of: dict[str, float], seeds: list[int], show_lr: bool) -> str:
    cols = (["lr"] if show_lr else []) + COLUMNS
    head = "| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    for name, lr in lr_of.items():
        finals = [results[run_key(setting, name, lr, s)]["test"] for s in seeds]
        cells = ([f"{lr:g}"] if show_lr else []) + [mean_std([f[c] for f in finals if c in f]) for c in COLUMNS]
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def plot(results: dict, setting: str, lr_of: dict[str, float], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcmi.io import write_with

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    keys = ("mm_acc", "uni_acc_audio", "uni_acc_visual")
    titles = ("multimodal accuracy", "audio (strong) head", "visual (weak) head")
    for name, lr in lr_of.items():
        hist = [results[run_key(setting, name, lr, s)]["history"] for s in seeds]
        rounds = [h["round"] for h in hist[0] if "mm_acc" in h]
        style = "-" if name.startswith(("FedCMI", "FedAvg", "FedProx")) and "only" not in name else "--"
        for ax, key in zip(axes, keys):
            if key not in hist[0][-1]:
                continue
            mean = [statistics.mean(h[i][key] for h in hist) for i in range(len(rounds))]
            ax.plot(rounds, mean, style, label=f"{name} (lr {lr:g})", lw=2.2 if name == "FedCMI" else 1.2)
    for ax, title in zip(axes, titles):
        ax.set_title(f"{title} (test), mean of seeds {seeds}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    handles: dict = {}
    for ax in axes:  # one legend for every method, whichever panels it appears in
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(f"{SETTING_TITLES[setting]}; each method at its validation-selected learning rate", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), help="which runs (names as in the tables)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05],
                    help="the learning-rate grid every method gets (the default lr must be in it)")
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one CPU thread each")
    ap.add_argument("--out", default=str(RESULTS / "accuracy"))
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "work"
    base = load_config(args.params, args.extra)
    default_lr = base.optim.lr
    if default_lr not in args.lrs:
        ap.error(f"the default optim.lr {default_lr} must be in --lrs")
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(RUNS)}")

    # Prepare each seed's data and partitions before the pool starts, so no two jobs prepare the same folder.
    for seed in args.seeds:
        for setting in args.settings:
            ensure_data(load_config(args.params, [f"seed={seed}", f"data.prepared_dir={work}/prepared_{seed}",
                                                  f"partition.file={work}/partition_{setting}_{seed}.json",
                                                  *SETTINGS[setting], *args.extra]))
    params = yaml.safe_load(Path(args.params).read_text())  # read once: later edits do not reach running jobs
    jobs = [(params, setting, name, lr, seed, tuple(args.extra), str(work))
            for setting in args.settings for name in args.runs for lr in args.lrs for seed in args.seeds]
    results: dict = {}
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for i, (key, r) in enumerate(pool.map(run_one, jobs), 1):
            results[key] = r
            print(f"[{i}/{len(jobs)} {time.perf_counter() - t0:7.0f}s] {key:55s} val {r['val']['mm_acc']:.3f} "
                  f"test {r['test']['mm_acc']:.3f} ({r['seconds']:.1f}s)", flush=True)
    wall = time.perf_counter() - t0

    extra = f" with {', '.join(args.extra)}" if args.extra else ""
    md = [f"Synthetic data, `params.yaml` defaults{extra} ({base.federation.rounds} rounds); "
          f"seeds {args.seeds}; final test accuracy, mean ± std over seeds.\n"]
    selected: dict = {}
    for setting in args.settings:
        fixed = {name: default_lr for name in args.runs}
        tuned = {name: select_lr(results, setting, name, args.lrs, args.seeds) for name in args.runs}
        selected[setting] = tuned
        md.append(f"### {SETTING_TITLES[setting]}\n\nEvery method at the default lr {default_lr:g}:\n")
        md.append(table(results, setting, fixed, args.seeds, show_lr=False))
        md.append(f"\nEach method at its own lr from {args.lrs}, chosen on the validation split:\n")
        md.append(table(results, setting, tuned, args.seeds, show_lr=True))
        md.append("")
        plot(results, setting, tuned, args.seeds, out / f"curves_{setting}.png")
    text = "\n".join(md)
    write_text(out / "tables.md", text)
    save_results(out / "results.json", {"seeds": args.seeds, "lrs": args.lrs, "default_lr": default_lr,
                                        "extra": args.extra, "settings": {s: SETTINGS[s] for s in args.settings},
                                        "runs": {n: RUNS[n] for n in args.runs}, "selected_lr": selected,
                                        "wall_seconds": round(wall, 1),
                                        "run_seconds_total": round(sum(r["seconds"] for r in results.values()), 1),
                                        "results": {k: compact(r) for k, r in results.items()}})
    print(text)


if __name__ == "__main__":
    main()
