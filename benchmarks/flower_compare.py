"""fedcmi's engine against Flower's simulation: wall time, per-round time and peak memory for the same FedAvg run.

    python benchmarks/flower_compare.py --rounds 20 100 --workers 1 2 --loads idle busy

Flower (``flwr[simulation]``, Ray backend) is installed for this benchmark
only, into ``benchmarks/.flower-venv`` (made on first use; it sees the
project's packages through a .pth file and adds Flower and Ray on top), so the
project's own environment never holds it.

Both run FedAvg on the default synthetic data with the same model, the same
clients (every client every round, so no sampler differs), the same local steps
(Flower's ClientApp calls fedcmi's own ``Federation.train_client``, the function
the engine runs), one torch thread per training process and one evaluation of
the final model. Each framework runs as it is meant to: the engine with
``federation.workers`` processes (1: every client in turn in the run's own
process), Flower with one Ray actor per CPU. ``--before`` adds the engine as the
first version ran it (one process, torch's own thread count). Each run is a
fresh process; the parent samples the memory of it and all its children (Ray's
processes included): the resident sizes added up, and the proportional set size
(shared pages counted once). Per-round time is (wall of R rounds - wall of 1
round) / (R - 1): start-up taken out. ``busy``: a second job keeps one core
busy throughout. Prints the figures and writes
benchmarks/results/flower_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / "benchmarks" / ".flower-venv"
FLWR = "flwr[simulation]==1.42.0"


def flower_python() -> Path:
    """The benchmark-only environment with Flower; made on first use."""
    py = VENV / "bin" / "python"
    if py.exists():
        return py
    print(f"making {VENV} with {FLWR} (once)", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    site = subprocess.run([str(py), "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    ours = subprocess.run([sys.executable, "-c", "import site; print(site.getsitepackages()[0])"], capture_output=True,
                          text=True, check=True).stdout.strip()
    Path(site, "fedcmi-project.pth").write_text(ours + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", FLWR], check=True)
    return py


# -- the two sides, each run in its own process -----------------------------------------------------
def config(work: Path, rounds: int, workers: int = 1, threads: int = 1):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import SPEED_SETTING, ensure_data

    from fedcmi.config import load_config

    cfg = load_config(ROOT / "params.yaml", [
        *SPEED_SETTING, f"threads={threads}", f"federation.workers={workers}",
        "algorithm.name=fedavg", f"federation.rounds={rounds}", f"evaluation.every={rounds}",
        "evaluation.linear_probe=false", "tracking.enabled=false", f"data.prepared_dir={work}/prepared",
        f"partition.file={work}/partition.json", f"output.dir={work}/out"])
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"clients_per_round": cfg.partition.num_clients})})  # every client, every round
    return cfg, ensure_data(cfg)


def run_engine(work: Path, rounds: int, workers: int, threads: int) -> dict:
    from fedcmi.runners.engine import train

    cfg, _ = config(work, rounds, workers, threads)
    t0 = time.perf_counter()
    res = train(cfg, work / "engine", resume="never", progress=False)
    return {"mm_acc": res.final.mm_acc, "seconds": time.perf_counter() - t0}


def run_flower(work: Path, rounds: int, workers: int, threads: int) -> dict:
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg
    from flwr.simulation import run_simulation

    from fedcmi.data import DataModule
    from fedcmi.federation import Federation
    from fedcmi.partition import load_partition

    cfg, _ = config(work, rounds)
    n = cfg.partition.num_clients
    t0 = time.perf_counter()
    client_app = ClientApp()
    _fed: list = []

    def federation() -> Federation:  # one per Ray actor, built on first use, as a Flower client would
        if not _fed:
            _fed.append(Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file)))
        return _fed[0]

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        cid = int(context.node_config["partition-id"])
        round_no = int(msg.content["config"]["server-round"])  # from 1, as fedcmi counts
        state = msg.content["arrays"].to_torch_state_dict()
        update = federation().train_client(dict(state), cid, round_no)
        content = RecordDict({"arrays": ArrayRecord(update.state),
                              "metrics": MetricRecord({"num-examples": update.num_examples})})
        return Message(content=content, reply_to=msg)

    server_app = ServerApp()
    result: dict = {}

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        fed = federation()
        strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=n, min_available_nodes=n)
        res = strategy.start(grid=grid, initial_arrays=ArrayRecord(fed.initial_state()), num_rounds=rounds,
                             train_config=ConfigRecord({}))
        final = {k: v for k, v in res.arrays.to_torch_state_dict().items()}
        result["mm_acc"] = fed.evaluate(final).mm_acc

    cpus = os.cpu_count() or 1
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})
    torch.set_num_threads(cpus)
    return {"mm_acc": result.get("mm_acc"), "seconds": time.perf_counter() - t0}


SIDES = {"engine": "engine, {w} worker(s)", "before": "engine as before (1 process, torch's threads)",
         "flower": "Flower simulation (1 Ray actor per CPU)"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, nargs="+", default=[20, 100])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="engine worker counts to time")
    ap.add_argument("--loads", nargs="+", choices=["idle", "busy"], default=["idle", "busy"])
    ap.add_argument("--before", action="store_true", help="also time the engine as the first version ran it")
    ap.add_argument("--side", choices=["engine", "flower"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flower_compare.json"))
    args = ap.parse_args()
    if args.side:
        fn = run_engine if args.side == "engine" else run_flower
        print(json.dumps(fn(Path(args.work), args.rounds[0], args.workers[0], args.threads)))
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import monitor, save_results, second_job

    py = flower_python()
    work = Path(tempfile.mkdtemp(prefix="fedcmi-flower-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    config(work, 1)  # prepare the data once, outside the timings
    me = str(Path(__file__).resolve())
    rounds_list = sorted({1, *args.rounds})
    # (label, python, side, workers, threads)
    sides = [(f"engine_w{w}", sys.executable, "engine", w, 1) for w in args.workers]
    if args.before:
        sides.insert(0, ("engine_before", sys.executable, "engine", 1, 0))
    sides.append(("flower", str(py), "flower", 1, 1))
    runs: dict[str, dict[str, dict[str, dict]]] = {}
    for load in args.loads:
        job = second_job() if load == "busy" else None
        try:
            for rounds in rounds_list:
                for label, python, side, w, t in sides:
                    out, wall, peak = monitor([python, me, "--side", side, "--work", str(work), "--rounds",
                                               str(rounds), "--workers", str(w), "--threads", str(t)], env)
                    runs.setdefault(load, {}).setdefault(label, {})[str(rounds)] = {
                        "wall_seconds": round(wall, 3), "peak_rss_mib": round(peak["rss"], 1),
                        "peak_pss_mib": round(peak["pss"], 1), "mm_acc": out["mm_acc"]}
                    print(f"{load:4s} {rounds:3d} round(s) {label:13s}: {wall:7.1f} s wall, peak "
                          f"{peak['rss']:6.0f} MiB RSS / {peak['pss']:6.0f} MiB PSS, final accuracy "
                          f"{out['mm_acc']:.4f}", flush=True)
        finally:
            if job is not None:
                job.kill()
                job.wait()
    summary: dict[str, dict] = {}
    for load, per in runs.items():
        for label, by_r in per.items():
            one = by_r["1"]["wall_seconds"]
            row: dict = {"startup_and_one_round_seconds": one}
            for r in args.rounds:
                if r > 1:
                    row[f"per_round_seconds_{r}"] = round((by_r[str(r)]["wall_seconds"] - one) / (r - 1), 3)
                row[f"wall_seconds_{r}"] = by_r[str(r)]["wall_seconds"]
                row[f"mm_acc_{r}"] = by_r[str(r)]["mm_acc"]
            row["peak_rss_mib"] = max(v["peak_rss_mib"] for v in by_r.values())
            row["peak_pss_mib"] = max(v["peak_pss_mib"] for v in by_r.values())
            summary.setdefault(load, {})[label] = row
        fl = summary[load]["flower"]
        for label, row in summary[load].items():
            if label == "flower":
                continue
            row["flower_over_this"] = {k: round(fl[k] / row[k], 3) for k in row
                                       if k.startswith(("per_round", "wall", "peak")) and row[k]}
            print(f"{load}: Flower / {label}: " + ", ".join(f"{k} x{v}" for k, v in row["flower_over_this"].items()))
    save_results(Path(args.out), {"clients_per_round": 10, "flower": FLWR, "rounds": args.rounds, "loads": args.loads,
                                  "summary": summary, "runs": runs})


if __name__ == "__main__":
    main()
