"""Peak memory with 10, 100 and 1000 clients over the same total data, for 1 and 2 worker processes.

    python benchmarks/memory_clients.py --clients 10 100 1000 --rounds 2 --workers 1 2

The default synthetic data (2400 training samples) split IID over N clients,
every client training in every round, so a round touches N models' worth of
updates. The engine keeps one model instance per process, folds each update
into a running sum as it arrives and keeps at most 2 x workers updates in
flight, and the workers read the memory-mapped data, so peak memory should not
grow with N. Each setting runs in a fresh process; the parent samples the
memory of it and its workers (resident sizes added up, and the proportional
set size, which counts pages the processes share once). Prints the figures and
writes benchmarks/results/memory_clients.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, SPEED_SETTING, ensure_data, monitor, save_results


def child(clients: int, rounds: int, algorithm: str, work: Path, workers: int) -> dict:
    from fedcmi.config import load_config
    from fedcmi.runners.engine import train

    cfg = load_config(ROOT / "params.yaml", [
        *SPEED_SETTING, "threads=1", f"federation.workers={workers}", f"algorithm.name={algorithm}",
        f"partition.num_clients={clients}",
        f"federation.clients_per_round={clients}",
        "partition.min_samples=1", f"federation.rounds={rounds}", f"evaluation.every={rounds}",
        "evaluation.linear_probe=false", "tracking.enabled=false", f"data.prepared_dir={work}/prepared",
        f"partition.file={work}/partition_{clients}.json", f"output.dir={work}/out_{clients}_{algorithm}_{workers}"])
    ensure_data(cfg)
    t0 = time.perf_counter()
    res = train(cfg, resume="never", progress=False)
    return {"clients": clients, "algorithm": algorithm, "workers": workers, "seconds": time.perf_counter() - t0,
            "seconds_per_round": (time.perf_counter() - t0) / rounds, "mm_acc": res.final.mm_acc}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--algorithms", nargs="+", default=["fedavg", "fedcmi"])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "memory_clients.json"))
    args = ap.parse_args()
    if args.child:
        clients, algorithm, work, workers = args.child
        print(json.dumps(child(int(clients), args.rounds, algorithm, Path(work), int(workers))))
        return
    work = Path(tempfile.mkdtemp(prefix="fedcmi-memory-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    for algorithm in args.algorithms:
        for workers in args.workers:
            for n in args.clients:
                row, wall, peak = monitor([sys.executable, __file__, "--rounds", str(args.rounds), "--child", str(n),
                                           algorithm, str(work), str(workers)], env)
                row.update(peak_rss_mib=round(peak["rss"], 1), peak_pss_mib=round(peak["pss"], 1))
                rows.append(row)
                print(f"{algorithm:7s} {workers} worker(s) {n:5d} clients: peak {peak['rss']:7.1f} MiB RSS, "
                      f"{peak['pss']:7.1f} MiB PSS, {row['seconds_per_round']:.2f} s/round, accuracy "
                      f"{row['mm_acc']:.3f}", flush=True)
    growth = {}
    for algorithm in args.algorithms:
        for workers in args.workers:
            peaks = [r["peak_pss_mib"] for r in rows if r["algorithm"] == algorithm and r["workers"] == workers]
            key = f"{algorithm}_w{workers}"
            growth[key] = round(max(peaks) / min(peaks), 4)
            print(f"{algorithm}, {workers} worker(s): largest / smallest PSS peak = {growth[key]}")
    save_results(Path(args.out), {"rounds": args.rounds, "total_train_samples": 2400, "rows": rows,
                                  "workers": args.workers,
                                  "pss_peak_ratio_largest_over_smallest": growth})


if __name__ == "__main__":
    main()
