"""Peak memory with 10, 100 and 1000 clients over the same total data.

    python benchmarks/memory_clients.py --clients 10 100 1000 --rounds 2

The default synthetic data (2400 training samples) split IID over N clients,
every client training in every round, so a round touches N models' worth of
updates. The engine keeps one model instance and folds each update into a
running sum as it arrives, so peak memory should not grow with N. Each
setting runs in a fresh process, which reports its own peak resident memory
(ru_maxrss). Prints the figures and writes benchmarks/results/memory_clients.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, SPEED_SETTING, ensure_data, save_results


def child(clients: int, rounds: int, algorithm: str, work: Path) -> dict:
    from fedcmi.config import load_config
    from fedcmi.engine import train

    cfg = load_config(ROOT / "params.yaml", [
        *SPEED_SETTING, f"algorithm.name={algorithm}", f"partition.num_clients={clients}",
        f"federation.clients_per_round={clients}",
        "partition.min_samples=1", f"federation.rounds={rounds}", f"evaluation.every={rounds}",
        "evaluation.linear_probe=false", "tracking.enabled=false", f"data.prepared_dir={work}/prepared",
        f"partition.file={work}/partition_{clients}.json", f"output.dir={work}/out_{clients}_{algorithm}"])
    ensure_data(cfg)
    t0 = time.perf_counter()
    res = train(cfg, resume="never", progress=False)
    return {"clients": clients, "algorithm": algorithm, "seconds": time.perf_counter() - t0,
            "seconds_per_round": (time.perf_counter() - t0) / rounds, "mm_acc": res.final["mm_acc"],
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--algorithms", nargs="+", default=["fedavg", "fedcmi"])
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(RESULTS / "memory_clients.json"))
    args = ap.parse_args()
    if args.child:
        clients, algorithm, work = args.child
        print(json.dumps(child(int(clients), args.rounds, algorithm, Path(work))))
        return
    work = Path(tempfile.mkdtemp(prefix="fedcmi-memory-"))
    rows = []
    for algorithm in args.algorithms:
        for n in args.clients:
            r = subprocess.run([sys.executable, __file__, "--rounds", str(args.rounds), "--child", str(n), algorithm,
                                str(work)], capture_output=True, text=True, check=True)
            row = json.loads(r.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{algorithm:7s} {n:5d} clients: peak {row['peak_rss_mib']:7.1f} MiB, "
                  f"{row['seconds_per_round']:.2f} s/round, accuracy {row['mm_acc']:.3f}", flush=True)
    growth = {}
    for algorithm in args.algorithms:
        peaks = [r["peak_rss_mib"] for r in rows if r["algorithm"] == algorithm]
        growth[algorithm] = round(max(peaks) / min(peaks), 4)
        print(f"{algorithm}: largest / smallest peak = {growth[algorithm]}")
    save_results(Path(args.out), {"rounds": args.rounds, "total_train_samples": 2400, "rows": rows,
                                  "peak_ratio_largest_over_smallest": growth})


if __name__ == "__main__":
    main()
