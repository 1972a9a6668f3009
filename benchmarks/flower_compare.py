"""fedcmi's engine against Flower's simulation: wall time and peak memory for the same FedAvg run.

    python benchmarks/flower_compare.py --rounds 5 --repeats 2

Flower (``flwr[simulation]``, Ray backend) is installed for this benchmark
only, into ``benchmarks/.flower-venv`` (made on first use; it sees the
project's packages through a .pth file and adds Flower and Ray on top), so the
project's own environment never holds it.

Both run FedAvg on the default synthetic data with the same model, the same
clients (every client every round, so no sampler differs), the same local steps
(Flower's ClientApp calls fedcmi's own ``Federation.train_client``, the function
the engine runs) and one evaluation of the final model. Each runs in a fresh
process; the parent samples the resident memory of that process and all its
children (Ray's processes included) every 50 ms. Each framework runs as it is
meant to: the engine trains clients one after another with every CPU thread,
Flower runs one Ray actor per CPU. Prints the figures and writes
benchmarks/results/flower_compare.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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


def monitor(cmd: list[str], env: dict) -> tuple[dict, float, float]:
    """Run ``cmd``; returns its JSON result, wall seconds and peak resident MiB of its process tree."""
    import psutil

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    root = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            procs = [root, *root.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs if p.is_running()))
        except psutil.Error:
            pass
        time.sleep(0.05)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1:3]} failed ({proc.returncode}):\n{err[-4000:]}")
    return json.loads(out.strip().splitlines()[-1]), wall, peak / 2**20


# -- the two sides, each run in its own process -----------------------------------------------------
def config(work: Path, rounds: int):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import SPEED_SETTING, ensure_data

    from fedcmi.config import load_config

    cfg = load_config(ROOT / "params.yaml", [
        *SPEED_SETTING, "algorithm.name=fedavg", f"federation.rounds={rounds}", f"evaluation.every={rounds}",
        "evaluation.linear_probe=false", "tracking.enabled=false", f"data.prepared_dir={work}/prepared",
        f"partition.file={work}/partition.json", f"output.dir={work}/out"])
    cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(
        update={"clients_per_round": cfg.partition.num_clients})})  # every client, every round
    return cfg, ensure_data(cfg)


def run_engine(work: Path, rounds: int) -> dict:
    from fedcmi.engine import train

    cfg, _ = config(work, rounds)
    t0 = time.perf_counter()
    res = train(cfg, work / "engine", resume="never", progress=False)
    return {"mm_acc": res.final["mm_acc"], "seconds": time.perf_counter() - t0}


def run_flower(work: Path, rounds: int) -> dict:
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
        rnd = int(msg.content["config"]["server-round"]) - 1
        state = msg.content["arrays"].to_torch_state_dict()
        update = federation().train_client(dict(state), cid, rnd)
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
        result["mm_acc"] = fed.evaluate(final).metrics["mm_acc"]

    cpus = os.cpu_count() or 1
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=n,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": cpus, "include_dashboard": False}})
    torch.set_num_threads(cpus)
    return {"mm_acc": result.get("mm_acc"), "seconds": time.perf_counter() - t0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--side", choices=["engine", "flower"], help=argparse.SUPPRESS)  # a child process
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "flower_compare.json"))
    args = ap.parse_args()
    if args.side:
        fn = run_engine if args.side == "engine" else run_flower
        print(json.dumps(fn(Path(args.work), args.rounds)))
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from common import save_results

    py = flower_python()
    work = Path(tempfile.mkdtemp(prefix="fedcmi-flower-"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_DEDUP_LOGS": "0"}
    config(work, args.rounds)  # prepare the data once, outside the timings
    me = str(Path(__file__).resolve())
    rounds_list = sorted({1, args.rounds})
    sides: dict[str, dict[int, dict[str, list]]] = {"engine": {}, "flower": {}}
    for rep in range(args.repeats):
        for rounds in rounds_list:
            for side, python in (("engine", sys.executable), ("flower", str(py))):
                out, wall, peak = monitor([python, me, "--side", side, "--work", str(work), "--rounds",
                                           str(rounds)], env)
                rec = sides[side].setdefault(rounds, {})
                for key, value in (("wall_seconds", wall), ("peak_mib", peak), ("mm_acc", out["mm_acc"])):
                    rec.setdefault(key, []).append(value)
                print(f"repeat {rep}, {rounds} round(s), {side:6s}: {wall:6.1f}s wall, peak {peak:7.0f} MiB "
                      f"(process tree), final accuracy {out['mm_acc']:.3f}", flush=True)
    med = {s: {r: {k: statistics.median(v) for k, v in d.items()} for r, d in per.items()} for s, per in sides.items()}
    r = args.rounds
    e, f = med["engine"], med["flower"]
    figures = {
        "rounds": r, "clients_per_round": 10, "flower": FLWR,
        "engine": e[r], "flower_simulation": f[r],
        "wall_time_ratio_flower_over_engine": round(f[r]["wall_seconds"] / e[r]["wall_seconds"], 3),
        "peak_memory_ratio_flower_over_engine": round(f[r]["peak_mib"] / e[r]["peak_mib"], 3),
        "repeats": {s: {str(k): v for k, v in per.items()} for s, per in sides.items()},
    }
    if r > 1:  # the cost of one more round, start-up (Python, torch, Ray) taken out
        per_round = {s: (m[r]["wall_seconds"] - m[1]["wall_seconds"]) / (r - 1) for s, m in med.items()}
        figures["seconds_per_round"] = {s: round(v, 3) for s, v in per_round.items()}
        figures["startup_seconds"] = {s: round(m[1]["wall_seconds"] - per_round[s], 3) for s, m in med.items()}
        figures["per_round_ratio_flower_over_engine"] = round(per_round["flower"] / per_round["engine"], 3)
    print(f"Flower / engine over {r} rounds: wall time x{figures['wall_time_ratio_flower_over_engine']}, "
          f"peak memory x{figures['peak_memory_ratio_flower_over_engine']}"
          + (f"; per round x{figures['per_round_ratio_flower_over_engine']}" if r > 1 else ""))
    save_results(Path(args.out), figures)


if __name__ == "__main__":
    main()
