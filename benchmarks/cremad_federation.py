"""A whole federation at CREMA-D shapes on one device: its round time, samples/s, device utilisation and
peak memory, per method.

    python benchmarks/cremad_federation.py --device cuda --precision bf16-mixed     # 10 clients, 5 a round, 20 rounds
    python benchmarks/cremad_federation.py --device cpu --samples 40 --test 8 --rounds 2 --batch-size 8   # a dry run

CREMA-D-shaped random data (``train_throughput.make_data``: a 1 x 257 x 299 spectrogram and ``--frames``
224 x 224 frames per clip, 6 classes; CREMA-D has 7442 clips, 6698 in FedCMI's training split), split IID
over ``--clients`` clients, every one multimodal; ResNet18 for both encoders, one local epoch, the engine
(`fedcmi.runners.engine.train`, what ``fedcmi train`` runs) with evaluation at the end only. The figures
are speed and memory: the labels are random, so accuracy means nothing here. Writes
benchmarks/results/cremad_federation_<device>_<precision>.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, save_results
from train_throughput import GpuPoll, make_data, sync

from fedcmi.config import config_from_dict
from fedcmi.data import DataModule
from fedcmi.partition import load_partition, make_partition, save_partition
from fedcmi.runners.engine import train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--precision", default="bf16-mixed", choices=["32", "bf16-mixed", "16-mixed"])
    ap.add_argument("--samples", type=int, default=6698, help="training clips (CREMA-D's training split: 6698)")
    ap.add_argument("--test", type=int, default=744, help="test clips")
    ap.add_argument("--frames", type=int, default=1)
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--per-round", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--loader-workers", type=int, default=4)
    ap.add_argument("--algorithms", nargs="+", default=["fedavg", "fedcmi"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    work = Path(tempfile.mkdtemp(prefix="fedcmi-cremad-"))
    t0 = time.perf_counter()
    make_data(work, args.samples, args.frames, test=args.test)
    data_s = time.perf_counter() - t0
    disk = sum(f.stat().st_size for f in (work / "prepared").rglob("*") if f.is_file())
    print(f"data: {args.samples} + {args.test} clips, {disk / 2**30:.2f} GiB, {data_s:.0f} s", flush=True)
    rows = {}
    for algorithm in args.algorithms:
        cfg = config_from_dict({
            "device": device.type, "data": {"prepared_dir": str(work / "prepared")},
            "partition": {"num_clients": args.clients, "scheme": "iid", "multimodal_fraction": 1.0,
                          "max_samples_per_client": None, "min_samples": 1, "file": str(work / "partition.json")},
            "model": {"encoders": {"audio": "resnet18", "visual": "resnet18"}, "embed_dim": 512},
            "federation": {"rounds": args.rounds, "clients_per_round": args.per_round, "local_epochs": 1,
                           "batch_size": args.batch_size},
            "evaluation": {"every": args.rounds, "linear_probe": False, "batch_size": args.batch_size},
            "optim": {"lr": 0.001, "precision": args.precision}, "algorithm": {"name": algorithm},
            "loader": {"workers": args.loader_workers if device.type == "cuda" else 0},
            "tracking": {"enabled": False}, "output": {"dir": str(work / "out")}})
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, 6), cfg.partition.file)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with GpuPoll(device) as poll:
            t1 = time.perf_counter()
            result = train(cfg, work / "out" / algorithm, progress=True)
            sync(device)
            seconds = time.perf_counter() - t1
        part = load_partition(cfg.partition.file)
        trained = sum(part.client(c).num_examples for r in result.history for c in r.participation.accepted)
        rounds = [r.timing.seconds for r in result.history]
        row = {"seconds": round(seconds, 1), "round_s_median": round(sorted(rounds)[len(rounds) // 2], 2),
               "trained_samples_per_s": round(trained / seconds, 1), "gpu_utilisation_pct": poll.mean,
               "final_mm_acc": result.final.mm_acc}
        if device.type == "cuda":
            row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20)
        rows[algorithm] = row
        print(f"{algorithm}: {row}", flush=True)
    name = args.out or str(RESULTS / f"cremad_federation_{device.type}_{args.precision}.json")
    save_results(Path(name), {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "precision": args.precision, "samples": args.samples, "test": args.test,
                              "frames": args.frames, "clients": args.clients, "per_round": args.per_round,
                              "rounds": args.rounds, "batch_size": args.batch_size,
                              "data_bytes": disk, "data_seconds": round(data_s, 1), "results": rows})


if __name__ == "__main__":
    main()
