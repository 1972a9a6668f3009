"""`dvc repro` from scratch: torch's threads and the client workers, idle and loaded.

Each measurement clones the committed project into a temporary folder (a fresh git repository, as a user's
first `dvc repro` finds it), sets `threads` and `federation.workers` in its params.yaml and times `dvc repro`
end to end (prepare, partition, train, evaluate, register into a new local MLflow store). "Loaded" runs two
such jobs at once, in two clones, as two users or an experiment queue sharing the machine do; both walls are
reported. The final mm_acc of every run shows whether the same settings gave the same model.

    python benchmarks/repro_threads.py --threads 0 1 --workers 1 --out benchmarks/results/repro_threads.json
    python benchmarks/repro_threads.py --threads 1 --workers 1 auto --out benchmarks/results/repro_workers.json

`threads: 0` is the first version's behaviour (torch's default, one thread per core); 1 is the default.
`workers: 1` trains a round's clients in turn in one process (every version before parallel workers);
`auto` is the default (the usable CPUs over `threads`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, save_results  # noqa: E402


def clone(dest: Path, threads: int, workers: str) -> Path:
    subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["threads"] = threads
    params["federation"]["workers"] = workers if workers == "auto" else int(workers)
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return dest


def start(repo: Path) -> tuple[subprocess.Popen, float]:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{repo}/mlflow.db"}
    env.pop("OMP_NUM_THREADS", None)  # torch's default must be its own
    dvc = [sys.executable, "-m", "dvc", "repro", "--force"]
    return subprocess.Popen(dvc, cwd=repo, env=env, stdout=open(repo / "repro.log", "w"),
                            stderr=subprocess.STDOUT), time.perf_counter()


def finish(proc: subprocess.Popen, t0: float, repo: Path) -> dict:
    rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        raise SystemExit(f"dvc repro failed in {repo}:\n{(repo / 'repro.log').read_text()[-3000:]}")
    history = json.loads((repo / "outputs/train/history.json").read_text())
    final = json.loads((repo / "outputs/train/metrics.json").read_text())
    train_s = sum(r["seconds"] for r in history)
    return {"wall_s": round(wall, 1), "train_rounds_s": round(train_s, 1),
            "s_per_round": round(train_s / len(history), 2), "mm_acc": round(final["mm_acc"], 4)}


def measure(threads: int, workers: str, jobs: int, work: Path) -> list[dict]:
    repos = [clone(work / f"t{threads}-w{workers}-j{jobs}-{i}", threads, workers) for i in range(jobs)]
    running = [start(r) for r in repos]
    return [finish(p, t0, r) for (p, t0), r in zip(running, repos, strict=False)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--workers", nargs="+", default=["1"], help="federation.workers values (a number or auto)")
    ap.add_argument("--out", type=Path, default=RESULTS / "repro_threads.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcmi-repro-threads-"))
    rows = []
    try:
        for threads in args.threads:
            for workers in args.workers:
                for jobs, load in ((1, "idle"), (2, "loaded (two jobs at once)")):
                    runs = measure(threads, workers, jobs, work)
                    row = {"threads": threads, "workers": workers, "load": load, "runs": runs}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_results(args.out, {"setting": "params.yaml defaults (dvc repro --force from a fresh clone)", "rows": rows})


if __name__ == "__main__":
    main()
