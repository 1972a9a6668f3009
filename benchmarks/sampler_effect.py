"""The modality-aware client sampler against uniform sampling: accuracy and each single-modality path,
paired by seed, at the default setting and with fewer multimodal clients.

    python benchmarks/sampler_effect.py --seeds 0 1 2 3 4 --fractions 0.5 0.0 --min-holders 2 --jobs 2

Each (fraction, seed) trains the params file's algorithm at its own learning rate twice, with
``federation.sampler`` uniform and modality_aware (``min_holders`` holders of each modality a round),
everything else equal; the difference is paired per seed. The share of rounds the sampler changed is
counted from the schedule itself (a round that already met the quotas is the uniform round). Writes
benchmarks/results/sampler_effect/results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from common import RESULTS, ensure_data, save_results

from fedcmi.config import apply_overrides, config_from_dict, load_config
from fedcmi.io import write_json
from fedcmi.round.schedule import Schedule
from fedcmi.runners.engine import train

FIGURES = ["mm_acc", "path_acc_audio", "path_acc_visual", "uni_acc_audio", "uni_acc_visual"]


def overrides(work: Path, fraction: float, seed: int, sampler: str, min_holders: int) -> list[str]:
    tag = f"f{fraction:g}_s{seed}"
    return [f"seed={seed}", f"data.prepared_dir={work}/prepared_{seed}", f"partition.file={work}/partition_{tag}.json",
            f"partition.multimodal_fraction={fraction}", f"federation.sampler={sampler}",
            f"federation.modality_aware.min_holders={min_holders}", "tracking.enabled=false",
            "evaluation.linear_probe=false", f"output.dir={work}/out"]


def run_one(job: tuple) -> tuple[str, dict]:
    params, work, fraction, seed, sampler, min_holders = job
    torch.set_num_threads(1)  # one core per job: results depend on the thread count
    key = f"f{fraction:g}|{sampler}|seed={seed}"
    cache = Path(work) / "runs" / (key.replace("|", "__") + ".json")
    if cache.is_file():
        return key, json.loads(cache.read_text())
    cfg = config_from_dict(apply_overrides(params, overrides(Path(work), fraction, seed, sampler, min_holders)))
    ensure_data(cfg)
    t0 = time.perf_counter()
    res = train(cfg, Path(work) / "out" / cache.stem, resume="never", progress=False)
    blind = config_from_dict(apply_overrides(params, overrides(Path(work), fraction, seed, "uniform", min_holders)))
    changed = sum(Schedule(cfg).clients(r) != Schedule(blind).clients(r) for r in range(1, cfg.federation.rounds + 1))
    out = {"test": res.final.flat(), "seconds": round(time.perf_counter() - t0, 1),
           "rounds_changed": changed, "rounds": cfg.federation.rounds}
    write_json(cache, out)
    return key, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(Path(__file__).resolve().parents[1] / "params.yaml"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5, 0.0])
    ap.add_argument("--min-holders", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--work", default=str(RESULTS / "sampler_effect" / "work"))
    ap.add_argument("--out", default=str(RESULTS / "sampler_effect"), help="where the table and results go")
    args = ap.parse_args()
    params = load_config(args.params).to_dict()
    work = Path(args.work)
    jobs = [(params, str(work), f, s, sampler, args.min_holders)
            for f in args.fractions for s in args.seeds for sampler in ("uniform", "modality_aware")]
    for f in args.fractions:  # data and partitions once, before the processes race for them
        for s in args.seeds:
            ensure_data(config_from_dict(apply_overrides(params, overrides(work, f, s, "uniform", args.min_holders))))
    results: dict[str, dict] = {}
    with ProcessPoolExecutor(args.jobs) as pool:
        for i, (key, out) in enumerate(pool.map(run_one, jobs), 1):
            results[key] = out
            print(f"[{i}/{len(jobs)}] {key}: mm_acc {out['test']['mm_acc']:.4f}", flush=True)
    rows = []
    for f in args.fractions:
        for sampler in ("uniform", "modality_aware"):
            runs = [results[f"f{f:g}|{sampler}|seed={s}"] for s in args.seeds]
            row = {"fraction": f, "sampler": sampler,
                   "rounds_changed": sum(r["rounds_changed"] for r in runs),
                   "rounds": sum(r["rounds"] for r in runs)}
            for name in FIGURES:
                vals = [r["test"][name] for r in runs]
                row[name] = (statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0)
                if sampler == "modality_aware":
                    base = [results[f"f{f:g}|uniform|seed={s}"]["test"][name] for s in args.seeds]
                    diff = [a - b for a, b in zip(vals, base, strict=True)]
                    row[f"delta_{name}"] = (statistics.mean(diff), statistics.stdev(diff) if len(diff) > 1 else 0.0)
            rows.append(row)
    lines = ["| multimodal fraction | sampler | rounds changed | " + " | ".join(FIGURES) + " |",
             "|---|---|---|" + "---|" * len(FIGURES)]
    for r in rows:
        cells = []
        for name in FIGURES:
            m, sd = r[name]
            cell = f"{m:.3f} ± {sd:.3f}"
            if f"delta_{name}" in r:
                dm, dsd = r[f"delta_{name}"]
                cell += f" (Δ {dm:+.3f} ± {dsd:.3f})"
            cells.append(cell)
        lines.append(f"| {r['fraction']:g} | {r['sampler']} | {r['rounds_changed']} of {r['rounds']} | "
                     + " | ".join(cells) + " |")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(table + "\n")
    save_results(out / "results.json", {"seeds": args.seeds, "fractions": args.fractions,
                                                  "min_holders": args.min_holders, "rows": rows, "runs": results})


if __name__ == "__main__":
    main()
