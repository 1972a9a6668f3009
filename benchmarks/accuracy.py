"""A fair comparison of every algorithm and ablation on the synthetic data.

    python benchmarks/accuracy.py --jobs 2

The protocol is `fedcmi compare`'s (its lr selection and grid growth are imported from it), run over this
repository's two settings and with its ablations and the imbalance table; on your own data and methods use
`fedcmi compare` itself. A trial of both gives the same model (BENCHMARKS.md, "fedcmi compare", shows the
command that reproduces this table's FedAvg figures).

The protocol, the same for every method:

1. **Learning rate chosen on validation.** Each (setting, method) trains at
   every learning rate of ``--lrs`` with the selection seeds
   (``--select-seeds``); the lr with the best mean *validation* multimodal
   accuracy wins (ties: the smaller lr). When the winner sits at an edge of
   the grid, the grid grows past that edge (halving or doubling) and the
   new lr is tried, until the winner is inside it (at most
   ``--max-extensions`` times). The test split chooses nothing.
2. **Five seeds at that lr.** The remaining seeds of ``--seeds`` train at the
   selected lr; every table reports all seeds.
3. **Same budget.** Every run trains ``params.yaml``'s rounds, local epochs,
   batch size and clients per round; only the method and its lr differ.
4. **Paired differences.** Against FedAvg on the same seed (so the same data,
   partition and client sampling): the mean and std of the per-seed
   difference, and on how many seeds the method is ahead.

Settings: ``default`` (params.yaml: Dirichlet label skew, half the clients
multimodal, a quarter audio only, a quarter visual only) and ``iid`` (every
client multimodal, IID: where the imbalance shows in its purest form).

Columns: ``mm_acc`` the multimodal prediction (the headline); ``path_acc_*``
a client holding only that modality predicting through the fusion head
(FedCMI: F(z_mm, z_mn), where infiltration acts; the plain network: the
other slot zero-filled); ``uni_acc_*`` each modality's own head;
``probe_acc_*`` a ridge probe on each frozen encoder, which compares encoders
across networks. The imbalance table sets the weak (visual) encoder's probe
trained jointly with FedAvg against trained alone, next to a random
encoder's probe and the generator's Bayes ceilings.

Writes ``results.json`` (every run: final test and validation metrics and
per-round history), ``tables.md`` and ``curves_<setting>.png`` under
``--out``. Finished runs are cached under ``--out``/work, so an interrupted
benchmark resumes where it stopped.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
import yaml
from common import RESULTS, ROOT, ensure_data, save_results

# Imported before the pool forks its workers, so a benchmark that runs for an hour keeps the code it started with.
from fedcmi.compare import next_lr, select_lr  # the protocol's rules, shared with `fedcmi compare`
from fedcmi.config import apply_overrides, config_from_dict, load_config
from fedcmi.datasets.synthetic import bayes_accuracy
from fedcmi.divergence import Diverged
from fedcmi.federation import Federation
from fedcmi.io import write_json, write_text
from fedcmi.partition import load_partition
from fedcmi.runners.engine import train

SETTINGS: dict[str, list[str]] = {
    "default": [],
    "iid": ["partition.scheme=iid", "partition.max_samples_per_client=null", "partition.multimodal_fraction=1.0"],
}
SETTING_TITLES = {
    "default": "the default setting (params.yaml): Dirichlet(1) label skew with the 1.1 cap, half the clients "
               "multimodal, a quarter audio only, a quarter visual only",
    "iid": "IID, every client multimodal",
}
RUNS: dict[str, list[str]] = {
    "FedAvg": ["algorithm.name=fedavg"],
    "FedAvg modality-aware": ["algorithm.name=fedavg", "algorithm.aggregation=modality_aware"],
    "FedProx (mu 0.01)": ["algorithm.name=fedprox", "algorithm.mu=0.01"],
    "FedAvg audio only": ["algorithm.name=unimodal", "algorithm.modality=audio"],
    "FedAvg visual only": ["algorithm.name=unimodal", "algorithm.modality=visual"],
    "OGM-GE": ["algorithm.name=ogm_ge"],
    "FedCMI": ["algorithm.name=fedcmi"],
    "FedCMI w/o infiltration": ["algorithm.name=fedcmi", "algorithm.fedcmi.infiltration=false"],
    "FedCMI w/o class temperature": ["algorithm.name=fedcmi", "algorithm.fedcmi.class_temperature=false"],
    "FedCMI one projector": ["algorithm.name=fedcmi", "model.projectors=one"],
    "FedCMI dominance per round": ["algorithm.name=fedcmi", "algorithm.fedcmi.dominance=round"],
    # FedAvg plus the weighted uni-modal losses on the FedCMI network, nothing else: plain aggregation,
    # no distillation. What FedCMI gains over this comes from infiltration and modality-aware aggregation.
    "Uni-modal heads only": ["algorithm.name=fedcmi", "algorithm.fedcmi.infiltration=false",
                             "algorithm.aggregation=plain"],
    # The suite beyond FedCMI: each at its own defaults; the protocol tunes the client lr alone.
    "PMR": ["algorithm.name=pmr"],
    "UMT": ["algorithm.name=umt"],
    "UME": ["algorithm.name=ume"],
    "MMPareto": ["algorithm.name=mmpareto"],
    "FedAvgM": ["algorithm.name=fedavgm"],
    "FedAdam": ["algorithm.name=fedadam"],
    "SCAFFOLD": ["algorithm.name=scaffold"],
}
SUITE = ["PMR", "UMT", "UME", "MMPareto", "FedAvgM", "FedAdam", "SCAFFOLD"]
SETTING_RUNS: dict[str, list[str]] = {
    "default": list(RUNS),
    # With every client multimodal, modality-aware aggregation is plain aggregation: those runs would repeat.
    "iid": ["FedAvg", "FedAvg audio only", "FedAvg visual only", "FedCMI", "FedCMI w/o infiltration", *SUITE],
}
COLUMNS = ["mm_acc", "path_acc_audio", "path_acc_visual", "uni_acc_audio", "uni_acc_visual", "probe_acc_audio",
           "probe_acc_visual", "worst_class_acc"]
BASELINE = "FedAvg"


def run_key(setting: str, name: str, lr: float, seed: int) -> str:
    return f"{setting}|{name}|lr={lr:g}|seed={seed}"


def data_overrides(work: str, setting: str, seed: int) -> list[str]:
    return [f"seed={seed}", f"data.prepared_dir={work}/prepared_{seed}",
            f"partition.file={work}/partition_{setting}_{seed}.json"]


def run_one(job: tuple) -> tuple[str, dict]:
    """One (setting, run, lr, seed): train, then evaluate on val and test. Cached under work/."""
    params, setting, name, lr, seed, extra, work = job
    torch.set_num_threads(1)  # one core per job (results depend on the thread count); --jobs sets how many at once
    key = run_key(setting, name, lr, seed)
    cache = Path(work) / "runs" / (key.replace("|", "__").replace(" ", "_").replace("/", "-") + ".json")
    if cache.is_file():
        return key, json.loads(cache.read_text())
    base = data_overrides(work, setting, seed) + [f"output.dir={work}/out", "tracking.enabled=false",
                                                  f"optim.lr={lr}"]
    cfg = config_from_dict(apply_overrides(params, base + SETTINGS[setting] + RUNS[name] + list(extra)))
    dm = ensure_data(cfg)
    t0 = time.perf_counter()
    try:
        res = train(cfg, Path(work) / "out" / cache.stem, resume="never", progress=False)
    except Diverged as exc:  # a diverged run is a result too: chance accuracy at this lr
        out = {"diverged": str(exc), "seconds": time.perf_counter() - t0, "history": [],
               "test": {"mm_acc": 1 / dm.spec.num_classes}, "val": {"mm_acc": 1 / dm.spec.num_classes}}
        write_json(cache, out)
        return key, out
    seconds = time.perf_counter() - t0
    fed = Federation(cfg, dm, load_partition(cfg.partition.file))
    val = fed.evaluate(res.state, split="val").flat()
    out = {"test": res.final.flat(), "val": val, "history": [r.to_json() for r in res.history], "seconds": seconds}
    write_json(cache, out)
    return key, out


def random_probe(job: tuple) -> tuple[int, dict]:
    """Probe accuracy of each encoder at initialisation (the FedAvg network, this seed)."""
    params, seed, extra, work = job
    torch.set_num_threads(1)
    cfg = config_from_dict(apply_overrides(params, data_overrides(work, "iid", seed) + SETTINGS["iid"]
                                           + ["algorithm.name=fedavg", "tracking.enabled=false", *extra]))
    dm = ensure_data(cfg)
    fed = Federation(cfg, dm, load_partition(cfg.partition.file))
    ev = fed.evaluate(fed.initial_state(), probe=True).flat()
    return seed, {k: v for k, v in ev.items() if k.startswith("probe_acc_")}


CURVE_KEYS = ("round", "mm_acc", "uni_acc_audio", "uni_acc_visual", "path_acc_audio", "path_acc_visual",
              "worst_class_acc", "imbalance_ratio", "dominant_frac_audio", "train_loss")


def compact(r: dict) -> dict:
    """A run without per-class figures, and its history cut to the curves' keys (the cache keeps it all)."""
    keep = lambda d: {k: v for k, v in d.items() if not k.startswith("class_acc_")}  # noqa: E731
    out = {"test": keep(r["test"]), "val": keep(r["val"]), "seconds": round(r["seconds"], 2),
           "history": [{k: h[k] for k in CURVE_KEYS if k in h} for h in r["history"]]}
    if "diverged" in r:
        out["diverged"] = r["diverged"]
    return out


def mean_std(vals: list[float]) -> str:
    if not vals:
        return "–"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"


def val_scores(results: dict, setting: str, name: str, lrs: list[float], seeds: list[int]) -> dict[float, float]:
    return {lr: statistics.mean(results[run_key(setting, name, lr, s)]["val"]["mm_acc"] for s in seeds)
            for lr in lrs}


def late_gain(history: list[dict], span: int = 5) -> float | None:
    """Mean test accuracy of the last ``span`` rounds minus that of the ``span`` before: near 0 when converged."""
    acc = [h["mm_acc"] for h in history if "mm_acc" in h]
    if len(acc) < 2 * span:
        return None
    return statistics.mean(acc[-span:]) - statistics.mean(acc[-2 * span:-span])


def table(results: dict, setting: str, names: list[str], lr_of: dict[str, float], grids: dict[str, list[float]],
          seeds: list[int]) -> str:
    cols = ["lr (grid)"] + COLUMNS + [f"Δ mm_acc vs {BASELINE} (paired)", "ahead", "last-5-round gain"]
    head = "| run | " + " | ".join(cols) + " |\n|---|" + "---|" * len(cols) + "\n"
    rows = []
    base = [results[run_key(setting, BASELINE, lr_of[BASELINE], s)]["test"]["mm_acc"] for s in seeds]
    for name in names:
        finals = [results[run_key(setting, name, lr_of[name], s)]["test"] for s in seeds]
        grid = ", ".join(f"{g:g}" for g in sorted(grids[name]))
        cells = [f"**{lr_of[name]:g}** ({grid})"] + [mean_std([f[c] for f in finals if c in f]) for c in COLUMNS]
        if name == BASELINE:
            cells += ["–", "–"]
        else:
            diffs = [f["mm_acc"] - b for f, b in zip(finals, base, strict=False)]
            cells += [f"{statistics.mean(diffs):+.3f} ± {statistics.stdev(diffs):.3f}",
                      f"{sum(d > 0 for d in diffs)}/{len(diffs)}"]
        gains = [late_gain(results[run_key(setting, name, lr_of[name], s)]["history"]) for s in seeds]
        cells.append(f"{statistics.mean(gains):+.3f}" if all(g is not None for g in gains) else "–")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(rows) + "\n"


def imbalance_table(results: dict, lr_of: dict[str, float], seeds: list[int], rand: dict[int, dict],
                    bayes: dict[str, float]) -> str:
    """The weak encoder starved by joint training: its probe inside FedAvg against trained alone (IID)."""
    joint = [results[run_key("iid", "FedAvg", lr_of["FedAvg"], s)]["test"]["probe_acc_visual"] for s in seeds]
    alone = [results[run_key("iid", "FedAvg visual only", lr_of["FedAvg visual only"], s)]["test"]["probe_acc_visual"]
             for s in seeds]
    strong_joint = [results[run_key("iid", "FedAvg", lr_of["FedAvg"], s)]["test"]["probe_acc_audio"] for s in seeds]
    strong_alone = [results[run_key("iid", "FedAvg audio only", lr_of["FedAvg audio only"], s)]["test"]
                    ["probe_acc_audio"] for s in seeds]
    gaps = [a - j for a, j in zip(alone, joint, strict=False)]
    lines = [
        "| encoder | random init | trained jointly (FedAvg) | trained alone | alone − joint (paired) |",
        "|---|---|---|---|---|",
        f"| visual (weak) | {mean_std([rand[s]['probe_acc_visual'] for s in seeds])} | {mean_std(joint)} | "
        f"{mean_std(alone)} | {statistics.mean(gaps):+.3f} ± {statistics.stdev(gaps):.3f} "
        f"(min {min(gaps):+.3f}) |",
        f"| audio (strong) | {mean_std([rand[s]['probe_acc_audio'] for s in seeds])} | {mean_std(strong_joint)} | "
        f"{mean_std(strong_alone)} | "
        f"{statistics.mean([a - j for a, j in zip(strong_alone, strong_joint, strict=False)]):+.3f} |",
        "",
        f"Bayes ceilings of the generator (ideal classifier on the template weights, white noise and jitter "
        f"ignored): strong (audio) alone {bayes['strong']:.3f}, weak (visual) alone {bayes['weak']:.3f}, "
        f"both {bayes['multimodal']:.3f}.",
    ]
    return "\n".join(lines) + "\n"


def plot_imbalance(results: dict, lr_of: dict[str, float], seeds: list[int], rand: dict[int, dict],
                   path: Path) -> None:
    """Each encoder's probe at random init, trained jointly (FedAvg) and trained alone, per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcmi.io import write_with

    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    groups = [("visual (weak)", "visual", "FedAvg visual only"), ("audio (strong)", "audio", "FedAvg audio only")]
    kinds = ("random init", "jointly (FedAvg)", "alone")
    for gi, (_label, m, alone_run) in enumerate(groups):
        vals = [[rand[s][f"probe_acc_{m}"] for s in seeds],
                [results[run_key("iid", "FedAvg", lr_of["FedAvg"], s)]["test"][f"probe_acc_{m}"] for s in seeds],
                [results[run_key("iid", alone_run, lr_of[alone_run], s)]["test"][f"probe_acc_{m}"] for s in seeds]]
        for ki, v in enumerate(vals):
            x = gi * 4 + ki
            ax.bar(x, statistics.mean(v), color=f"C{ki}", label=kinds[ki] if gi == 0 else None, alpha=0.8)
            ax.scatter([x] * len(v), v, color="black", s=10, zorder=3)
    ax.set_xticks([1, 5], [g[0] for g in groups])
    ax.set_ylabel("ridge probe accuracy on the frozen encoder (test)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"Joint training starves the weak encoder (IID, every client multimodal; dots: seeds {seeds})",
                 fontsize=9)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot_lr(scores: dict[str, dict[float, float]], setting: str, path: Path) -> None:
    """Mean validation accuracy against the learning rate, per method: where each choice sits in its grid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcmi.io import write_with

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, (name, by_lr) in enumerate(scores.items()):
        lrs = sorted(by_lr)
        best = select_lr(by_lr)
        color = plt.get_cmap("tab20")(i % 20)
        ax.plot(lrs, [by_lr[lr] for lr in lrs], "-o", ms=3, color=color, label=name,
                lw=2.2 if name == "FedCMI" else 1.1)
        ax.scatter([best], [by_lr[best]], s=60, facecolors="none", edgecolors=[color])
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("validation multimodal accuracy (mean of the selection seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"{setting}: each method's lr grid; circled: the chosen lr", fontsize=9)
    fig.tight_layout()
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def plot(results: dict, setting: str, names: list[str], lr_of: dict[str, float], seeds: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedcmi.io import write_with

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    keys = ("mm_acc", "path_acc_audio", "path_acc_visual")
    titles = ("multimodal accuracy", "audio-only path", "visual-only path")
    for i, name in enumerate(names):
        lr = lr_of[name]
        hist = [results[run_key(setting, name, lr, s)]["history"] for s in seeds]
        if not all(hist):
            continue
        rounds = [h["round"] for h in hist[0] if "mm_acc" in h]
        style = "-" if name.startswith(("FedCMI", "FedAvg", "FedProx")) and "only" not in name else "--"
        for ax, key in zip(axes, keys, strict=False):
            if key not in hist[0][-1]:
                continue
            mean = [statistics.mean(h[i][key] for h in hist) for i in range(len(rounds))]
            ax.plot(rounds, mean, style, color=plt.get_cmap("tab20")(i % 20), label=f"{name} (lr {lr:g})",
                    lw=2.2 if name == "FedCMI" else 1.2)  # one colour per method in every panel
    for ax, title in zip(axes, titles, strict=False):
        ax.set_title(f"{title} (test), mean of seeds {seeds}", fontsize=9)
        ax.set_xlabel("round")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    handles: dict = {}
    for ax in axes:  # one legend for every method, whichever panels it appears in
        for h, label in zip(*ax.get_legend_handles_labels(), strict=False):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle(f"{SETTING_TITLES[setting]}; each method at its validation-selected learning rate", fontsize=10)
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    write_with(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--select-seeds", type=int, nargs="+", default=[0, 1],
                    help="the seeds whose mean validation accuracy chooses each method's lr")
    ap.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--runs", nargs="+", default=list(RUNS), help="which runs (names as in the tables)")
    ap.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.02, 0.05],
                    help="the starting learning-rate grid of every method; it grows past an edge that wins")
    ap.add_argument("--max-extensions", type=int, default=3)
    ap.add_argument("--set", dest="extra", action="append", default=[], help="extra override for every run")
    ap.add_argument("--jobs", type=int, default=1, help="runs at once, one CPU thread each")
    ap.add_argument("--workers", type=int, default=1, help="federation.workers of each run: processes training its "
                    "clients (the model does not depend on it); keep jobs x workers at the cores")
    ap.add_argument("--out", default=str(RESULTS / "accuracy"))
    args = ap.parse_args()
    out = Path(args.out)
    work = out / "work"
    args.extra = [f"federation.workers={args.workers}", *args.extra]
    base = load_config(args.params, args.extra)
    unknown = [r for r in args.runs if r not in RUNS]
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {list(RUNS)}")
    if not set(args.select_seeds) <= set(args.seeds):
        ap.error("--select-seeds must be among --seeds")
    if BASELINE not in args.runs:
        ap.error(f"the runs must include {BASELINE}, the paired baseline")
    plan = {s: [n for n in SETTING_RUNS[s] if n in args.runs] for s in args.settings}

    # Prepare each seed's data and partitions before the pool starts, so no two jobs prepare the same folder.
    for seed in args.seeds:
        for setting in args.settings:
            ensure_data(load_config(args.params, [*data_overrides(str(work), setting, seed), *SETTINGS[setting],
                                                  *args.extra]))
    params = yaml.safe_load(Path(args.params).read_text())  # read once: later edits do not reach running jobs
    results: dict = {}
    t0 = time.perf_counter()
    done = 0

    def run_wave(pool: ProcessPoolExecutor, keys: list[tuple[str, str, float, int]]) -> None:
        nonlocal done
        jobs = [(params, s, n, lr, seed, tuple(args.extra), str(work)) for s, n, lr, seed in keys
                if run_key(s, n, lr, seed) not in results]
        for key, r in pool.map(run_one, jobs):
            results[key] = r
            done += 1
            state = "DIVERGED" if "diverged" in r else f"val {r['val']['mm_acc']:.3f} test {r['test']['mm_acc']:.3f}"
            print(f"[{done} {time.perf_counter() - t0:6.0f}s] {key:58s} {state} ({r['seconds']:.1f}s)", flush=True)

    grids = {s: {n: sorted(args.lrs) for n in names} for s, names in plan.items()}
    selected: dict[str, dict[str, float]] = {s: {} for s in plan}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        # 1. lr selection on the validation split, growing the grid past a winning edge.
        pending = {(s, n) for s, names in plan.items() for n in names}
        for extension in range(args.max_extensions + 1):
            run_wave(pool, [(s, n, lr, seed) for s, n in sorted(pending) for lr in grids[s][n]
                            for seed in args.select_seeds])
            grown = set()
            for s, n in sorted(pending):
                best = select_lr(val_scores(results, s, n, grids[s][n], args.select_seeds))
                selected[s][n] = best
                nxt = next_lr(grids[s][n], best)
                if nxt is not None and extension < args.max_extensions:  # never a grid lr that will not run
                    grids[s][n] = sorted(grids[s][n] + [nxt])
                    grown.add((s, n))
            pending = grown
            if not pending:
                break
        for s, n in sorted(pending):  # out of extensions: keep the best so far, and say so in the table
            selected[s][n] = select_lr(val_scores(results, s, n, grids[s][n], args.select_seeds))
        # 2. the remaining seeds at each selected lr; 3. the random-init probes for the imbalance table.
        run_wave(pool, [(s, n, selected[s][n], seed) for s, names in plan.items() for n in names
                        for seed in args.seeds])
        rand = dict(pool.map(random_probe, [(params, seed, tuple(args.extra), str(work)) for seed in args.seeds]))
    wall = time.perf_counter() - t0

    extra = f" with {', '.join(args.extra)}" if args.extra else ""
    fed = base.federation
    md = [f"Synthetic data (`generator: {base.data.synthetic.generator}`), `params.yaml` defaults{extra}: "
          f"{fed.rounds} rounds, {fed.local_epochs} local epochs, batch {fed.batch_size}, {fed.clients_per_round} "
          f"of {base.partition.num_clients} clients per round. Each method's lr chosen on validation with seeds "
          f"{args.select_seeds}; final test accuracy, mean ± std over seeds {args.seeds}. Paired: the per-seed "
          f"difference to {BASELINE} (same data, partition and client sampling).\n"]
    if "iid" in plan and {"FedAvg", "FedAvg visual only", "FedAvg audio only"} <= set(plan["iid"]):
        md.append("### The imbalance: encoder probes, IID, every client multimodal\n")
        md.append(imbalance_table(results, selected["iid"], args.seeds, rand, bayes_accuracy(base.data.synthetic)))
        plot_imbalance(results, selected["iid"], args.seeds, rand, out / "imbalance.png")
    for setting, names in plan.items():
        md.append(f"### {SETTING_TITLES[setting]}\n")
        md.append(table(results, setting, names, selected[setting], grids[setting], args.seeds))
        diverged = sorted(k for k, r in results.items() if k.startswith(setting + "|") and "diverged" in r)
        if diverged:
            md.append("Diverged (stopped by the guard, counted at chance): " + ", ".join(diverged) + "\n")
        plot(results, setting, names, selected[setting], args.seeds, out / f"curves_{setting}.png")
        plot_lr({n: val_scores(results, setting, n, grids[setting][n], args.select_seeds) for n in names}, setting,
                out / f"lr_{setting}.png")
    text = "\n".join(md)
    write_text(out / "tables.md", text)
    save_results(out / "results.json", {
        "seeds": args.seeds, "select_seeds": args.select_seeds, "start_lrs": args.lrs, "extra": args.extra,
        "settings": {s: SETTINGS[s] for s in plan}, "runs": {n: RUNS[n] for n in args.runs},
        "grids": grids, "selected_lr": selected,
        "val_scores": {s: {n: {f"{lr:g}": round(v, 4) for lr, v in
                               val_scores(results, s, n, grids[s][n], args.select_seeds).items()}
                           for n in names} for s, names in plan.items()},
        "random_probe": rand, "wall_seconds": round(wall, 1),
        "run_seconds_total": round(sum(r["seconds"] for r in results.values()), 1),
        "results": {k: compact(r) for k, r in results.items()}})
    print(text)


if __name__ == "__main__":
    main()
