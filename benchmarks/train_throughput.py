"""Local-training throughput at CREMA-D shapes: the engine's client step against a bare PyTorch loop.

    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --samples 1024 --batch-size 64
    python benchmarks/train_throughput.py --device cpu --samples 48 --batch-size 16      # no GPU at hand
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --samples 1024 --batch-size 64 \
        --clients 1 8 32 --fixed-cost 8   # rounds of 1, 8 and 32 clients sharing the samples; fixed cost by part
    python benchmarks/train_throughput.py --device cuda --precision bf16-mixed --samples 1024 --batch-size 64 \
        --clients 8 --client-workers 4     # a round of 8 small clients, 4 trained at once on the one GPU

One client holding ``--samples`` CREMA-D-shaped samples (a 1 x 257 x 299 log
spectrogram, ``--frames`` 3 x 224 x 224 uint8 frames, 6 classes) in the prepared,
memory-mapped cache; ResNet18 for both encoders (512-d). The engine side is
``Federation.train_client``, the function every runner calls, timed over one
local epoch after a warm-up epoch; the bare side is a hand-written loop over the
same batches with the same precision (autocast, and loss scaling for 16-mixed).
On CUDA the GPU's utilisation is polled with nvidia-smi while the engine trains.
Prints samples per second and writes benchmarks/results/train_throughput_<device>_<precision>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import RESULTS, save_results

from fedcmi.algorithms import build_model
from fedcmi.config import config_from_dict
from fedcmi.data import DataModule
from fedcmi.data.base import DatasetSpec, PreparedWriter
from fedcmi.data.cache import IMAGENET_NORM
from fedcmi.federation import Federation
from fedcmi.partition import make_partition, save_partition


def make_data(work: Path, n: int, frames: int, seed: int = 0, test: int = 8) -> Path:
    spec = DatasetSpec(("audio", "visual"), {"audio": (1, 257, 299), "visual": (frames, 3, 224, 224)}, 6,
                       ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG"), dtypes={"visual": "uint8"},
                       normalize={"visual": IMAGENET_NORM})
    rng = np.random.default_rng(seed)
    with PreparedWriter(work / "prepared", spec, {"train": n, "test": test}) as w:
        for split, count in (("train", n), ("test", test)):
            for i in range(count):
                w.add(split, {"audio": rng.standard_normal((1, 257, 299), dtype=np.float32),
                              "visual": rng.integers(0, 256, (frames, 3, 224, 224), dtype=np.uint8)}, i % 6)
        w.commit({"name": "cremad-shaped random data"})
    return work / "prepared"


class GpuPoll:
    """Mean GPU utilisation (nvidia-smi) while a block runs; None without a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.on = device.type == "cuda" and shutil.which("nvidia-smi") is not None
        self.samples: list[float] = []

    def _run(self) -> None:
        while not self._stop.is_set():
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                  f"--id={torch.cuda.current_device()}"], capture_output=True, text=True)
            if out.returncode == 0 and out.stdout.strip():
                self.samples.append(float(out.stdout.strip().splitlines()[0]))
            self._stop.wait(0.2)

    def __enter__(self) -> GpuPoll:
        if self.on:
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self._stop.set()
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(statistics.mean(self.samples), 1) if self.samples else None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_epoch(cfg, dm, device: torch.device) -> float:
    """One epoch of FedAvg's local step by hand, over the same batches and precision; returns seconds."""
    model = build_model(cfg, dm.spec).to(device)
    model.train()
    o = cfg.optim
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    half = torch.bfloat16 if o.precision == "bf16-mixed" else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=o.precision == "16-mixed")
    order = np.random.default_rng(0).permutation(len(dm.train))
    times = []
    for _ in range(2):  # the first epoch warms up (kernel choice, caches); the second is timed
        sync(device)
        t0 = time.perf_counter()
        for start in range(0, len(order), cfg.federation.batch_size):
            x, y = dm.train.batch(order[start:start + cfg.federation.batch_size], dm.spec.modalities)
            x = {m: v.to(device, non_blocking=True) for m, v in x.items()}
            y = y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=half, enabled=o.precision != "32"):
                loss = F.cross_entropy(model(x).mm_logits, y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times[-1]


def engine_epoch(cfg, dm, device: torch.device) -> tuple[float, float | None]:
    from fedcmi.partition import load_partition

    fed = Federation(cfg, dm, load_partition(cfg.partition.file), device)
    state = fed.initial_state()
    fed.train_client(state, 0, 1)  # warm-up
    sync(device)
    with GpuPoll(device) as poll:
        t0 = time.perf_counter()
        fed.train_client(state, 0, 2)
        sync(device)
        seconds = time.perf_counter() - t0
    return seconds, poll.mean


def round_time(cfg, dm, device: torch.device, client_workers: int = 1) -> dict:
    """A whole round (every client trains one local epoch, the server folds the updates) and the global
    model's evaluation on the test split, timed after a warm-up round (which also starts the workers). With
    ``client_workers`` > 1 that many processes train clients at once, each on the same device."""
    from fedcmi.partition import load_partition
    from fedcmi.round.close import close_round
    from fedcmi.round.outcomes import client_outcomes
    from fedcmi.round.schedule import sample_clients
    from fedcmi.workers import ClientWorkers

    fed = Federation(cfg, dm, load_partition(cfg.partition.file), device)
    with ClientWorkers(cfg, client_workers) as pool:
        workers = pool if client_workers > 1 else None

        def one_round(state, round_no):
            clients = sample_clients(cfg, round_no)
            return close_round(fed, state, clients, client_outcomes(fed, state, clients, round_no, workers),
                               round_no, evaluate=False)

        state = one_round(fed.initial_state(), 1).state  # warm-up
        sync(device)
        t0 = time.perf_counter()
        res = one_round(state, 2)
        sync(device)
        trained = time.perf_counter() - t0
    t1 = time.perf_counter()
    fed.evaluate(res.state)
    sync(device)
    return {"clients": len(res.record.participation.accepted), "client_workers": client_workers,
            "round_s": round(trained, 3),
            "evaluate_s": round(time.perf_counter() - t1, 3), "round_samples_per_s": round(len(dm.train) / trained, 2)}


def fixed_cost(cfg, dm, device: torch.device, clients: int = 8, workers: tuple[int, ...] = (0, 2)) -> dict:
    """The per-client fixed cost, part by part, in milliseconds (median over ``clients`` clients after one
    warm-up client): the global state loaded into the resident model, the client's loader up to its first
    batch (for each loader worker count, a client after another, as in a round), the update copied off the
    model, its admission (checks and the float64 change norm) and its fold into the round's mean."""
    from fedcmi.algorithms.base import snapshot
    from fedcmi.partition import load_partition
    from fedcmi.round.admission import Admission
    from fedcmi.round.update import ClientUpdate
    from fedcmi.rules.mean import Mean

    part = load_partition(cfg.partition.file)
    times: dict[str, list[float]] = {}
    warm = [True]

    @contextlib.contextmanager
    def timed(name: str):
        sync(device)
        t0 = time.perf_counter()
        yield
        sync(device)
        if not warm[0]:  # the first client of each loader set-up warms up
            times.setdefault(name, []).append((time.perf_counter() - t0) * 1e3)

    for w in workers:
        one = cfg.model_copy(update={"loader": cfg.loader.model_copy(update={"workers": w})})
        fed = Federation(one, dm, part, device)
        state = fed.initial_state()
        rule = Mean(state, fed.model.owner if one.aggregation == "modality_aware" else None)
        for k in range(clients + 1):
            warm[0] = k == 0
            cid = k % len(part.clients)
            with timed("load_state"):
                fed.load(state)
            ctx = fed.client_context(cid, k + 1)
            assert ctx is not None
            with timed(f"loader_first_batch_w{w}"):
                next(iter(ctx.batches(0)))
            with timed("snapshot_update"):
                update = ClientUpdate(cid, snapshot(fed.model), ctx.num_examples, ctx.modalities, {})
            admission = Admission(k + 1, [cid], part, fed.strategy.participates, fed.strategy.name,
                                  one.server.max_change_ratio, state)  # the round's stage, as the server runs it
            with timed("admission"):
                admission.admit(cid, update)
            with timed("fold"):
                rule.add(update)
    return {name: round(statistics.median(v), 2) for name, v in times.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="32", choices=["32", "bf16-mixed", "16-mixed"])
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--algorithms", nargs="+", default=["fedavg", "fedcmi"])
    ap.add_argument("--workers", type=int, default=0, help="loader.workers: processes reading batches")
    ap.add_argument("--clients", type=int, nargs="*", default=[],
                    help="also time a whole round of each of these many clients sharing the samples (1 8 32)")
    ap.add_argument("--client-workers", type=int, default=1,
                    help="federation.workers for that round: processes training clients at once on the device")
    ap.add_argument("--fixed-cost", type=int, default=0, metavar="N",
                    help="also time the per-client fixed cost part by part over N clients (0: skip)")
    ap.add_argument("--fixed-cost-only", action="store_true", help="time the fixed cost only, no epochs")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="fedcmi-throughput-"))
    make_data(work, args.samples, args.frames)
    rows = {}
    for algorithm in args.algorithms:
        cfg = config_from_dict({
            "device": device.type, "data": {"prepared_dir": str(work / "prepared")},
            "partition": {"num_clients": 1, "file": str(work / "partition.json"), "min_samples": 1},
            "model": {"encoders": {"audio": "resnet18", "visual": "resnet18"}, "embed_dim": 512},
            "federation": {"rounds": 1, "clients_per_round": 1, "batch_size": args.batch_size},
            "optim": {"lr": 0.001, "precision": args.precision}, "algorithm": {"name": algorithm},
            "tracking": {"enabled": False}, "output": {"dir": str(work / "out")},
            "loader": {"workers": args.workers}})
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, 6), cfg.partition.file)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if args.fixed_cost:
            cost = fixed_cost(cfg, dm, device, args.fixed_cost)
            print(f"{algorithm} fixed cost per client (ms): {cost}", flush=True)
            if args.fixed_cost_only:
                rows[algorithm] = {"fixed_cost_ms": cost}
                continue
        seconds, util = engine_epoch(cfg, dm, device)
        row = {"engine_samples_per_s": round(args.samples / seconds, 2), "gpu_utilisation_pct": util}
        if args.fixed_cost:
            row["fixed_cost_ms"] = cost
        if device.type == "cuda":
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        if algorithm == "fedavg":  # the like-for-like comparison: FedAvg's local step is plain cross-entropy
            bare = bare_epoch(cfg, dm, device)
            row["bare_samples_per_s"] = round(args.samples / bare, 2)
            row["engine_over_bare_time"] = round(seconds / bare, 4)
        for n in args.clients:  # a round of n clients sharing the samples, against the one client above
            many = cfg.model_copy(update={
                "partition": cfg.partition.model_copy(update={"num_clients": n, "scheme": "iid",
                                                              "multimodal_fraction": 1.0,
                                                              "max_samples_per_client": None,
                                                              "file": work / f"partition{n}.json"}),
                "federation": cfg.federation.model_copy(update={"clients_per_round": n, "local_epochs": 1})})
            save_partition(make_partition(many, dm.train.labels, dm.spec.modalities, 6), many.partition.file)
            rnd = round_time(many, dm, device, args.client_workers)
            rnd["over_one_client"] = round(rnd["round_samples_per_s"] / row["engine_samples_per_s"], 3)
            # what each client adds beyond its share of the one client's epoch
            rnd["fixed_cost_per_client_ms"] = round((rnd["round_s"] - seconds) / n * 1e3, 1)
            row[f"round_{n}_clients"] = rnd
        rows[algorithm] = row
        print(f"{algorithm}: {row}", flush=True)
    suffix = ((f"_w{args.workers}" if args.workers else "") + ("_c" + "-".join(map(str, args.clients))
                                                              if args.clients else "")
              + (f"_p{args.client_workers}" if args.client_workers > 1 else ""))
    name = args.out or str(RESULTS / f"train_throughput_{device.type}_{args.precision}{suffix}.json")
    save_results(Path(name), {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "precision": args.precision, "loader_workers": args.workers, "clients": args.clients,
                              "client_workers": args.client_workers,
                              "samples": args.samples, "batch_size": args.batch_size,
                              "frames": args.frames, "shapes": {"audio": [1, 257, 299], "visual": [args.frames, 3,
                                                                                                    224, 224]},
                              "results": rows})


if __name__ == "__main__":
    main()
