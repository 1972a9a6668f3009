"""Bytes each pipeline pod receives per round, at CREMA-D's shapes: the first version against this one.

    python benchmarks/pod_bytes.py

CREMA-D as prepared by `fedcmi prepare` with the default settings (6698 train and 744 test clips, a
257 x 299 float32 log spectrogram and one 3 x 224 x 224 uint8 frame each: 3.2 GiB), partitioned by
params.yaml's partition settings (10 clients, Dirichlet label skew, half the clients multimodal) over
labels drawn with CREMA-D's class sizes, and the FedCMI model of params.yaml built for that spec.

First version: every pod took the whole prepared folder as an artifact, plus the partition and the
models. Now: a client pod reads its own rows of the modalities it trains (the arrays are memory-mapped
on the data volume, so nothing else is read), the conclude pod the test split on evaluation rounds, and
aggregation itself no data. Models move as they did. Prints the figures and writes them to
benchmarks/results/pod_bytes.json.
"""

import argparse
import json
from pathlib import Path

import numpy as np  # noqa: E402
from common import ROOT, save_results  # noqa: E402  (puts the project on the path)

from fedcmi.algorithms import (
    build_model,  # noqa: E402
    get_strategy,  # noqa: E402
)
from fedcmi.config import load_config  # noqa: E402
from fedcmi.data.cache import audio_visual_spec  # noqa: E402
from fedcmi.partition import make_partition  # noqa: E402

CREMA_D = {"train": 6698, "test": 744}
CLASSES = ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
CLASS_SHARE = np.array([1087, 1271, 1271, 1271, 1271, 1271]) / 7442  # neutral has fewer clips


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--rounds", type=int, default=180)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "pod_bytes.json"))
    args = ap.parse_args()
    cfg = load_config(args.params, ["data.name=cremad", "algorithm.name=fedcmi"])
    spec = audio_visual_spec(cfg.data.cremad, CLASSES)
    row = {m: int(np.prod(spec.shapes[m])) * np.dtype(spec.dtype(m)).itemsize for m in spec.modalities}
    label_row = 8
    split_bytes = {s: n * (sum(row.values()) + label_row) for s, n in CREMA_D.items()}
    prepared = sum(split_bytes.values())

    labels = np.random.default_rng(cfg.seed).choice(len(CLASSES), size=CREMA_D["train"], p=CLASS_SHARE)
    part = make_partition(cfg, labels, spec.modalities, len(CLASSES))
    partition_bytes = len(json.dumps(part.to_json(), indent=2, sort_keys=True).encode())
    model_bytes = sum(v.numel() * v.element_size() for v in build_model(cfg, spec).state_dict().values())
    strategy = get_strategy(cfg)

    clients = []
    for cid, shard in enumerate(part.clients):
        mods = strategy.batch_modalities(shard.modalities) if strategy.participates(shard.modalities) else ()
        data = len(shard.indices) * (sum(row[m] for m in mods) + label_row)
        clients.append({"client": cid, "modalities": list(shard.modalities), "samples": len(shard.indices),
                        "data_bytes": data})
    per_round = cfg.federation.clients_per_round
    mean_client = float(np.mean([c["data_bytes"] for c in clients]))
    evals = sum(1 for r in range(args.rounds) if (r + 1) % cfg.evaluation.every == 0 or r + 1 == args.rounds)

    # first version: per round, clients_per_round client pods + aggregate + evaluate, each with everything
    before_pod = prepared + partition_bytes + model_bytes
    before_round = per_round * before_pod + (prepared + partition_bytes + (per_round + 1) * model_bytes) \
        + (prepared + partition_bytes + model_bytes)
    # now: client pods (their rows + the model), one conclude pod (updates + global, the test split when it
    # evaluates)
    after_client = mean_client + partition_bytes + model_bytes
    after_conclude_eval = split_bytes["test"] + partition_bytes + (per_round + 1) * model_bytes
    after_conclude = partition_bytes + (per_round + 1) * model_bytes
    after_run = (args.rounds * (per_round * after_client + after_conclude)
                 + evals * split_bytes["test"])
    gib = float(1 << 30)
    res = {
        "dataset": "CREMA-D shapes (6698 train / 744 test; audio 257x299 float32, 1 frame 3x224x224 uint8)",
        "prepared_gib": round(prepared / gib, 3), "test_split_gib": round(split_bytes["test"] / gib, 3),
        "model_mib": round(model_bytes / (1 << 20), 1), "partition_kib": round(partition_bytes / 1024, 1),
        "clients": clients, "clients_per_round": per_round, "rounds": args.rounds, "evaluations": evals,
        "before": {"client_pod_gib": round(before_pod / gib, 3), "aggregate_pod_gib": round(
            (prepared + partition_bytes + (per_round + 1) * model_bytes) / gib, 3),
            "evaluate_pod_gib": round(before_pod / gib, 3), "per_round_gib": round(before_round / gib, 2),
            "run_tib": round(args.rounds * before_round / gib / 1024, 2)},
        "after": {"client_pod_gib_mean": round(after_client / gib, 3),
                  "client_pod_gib_max": round((max(c["data_bytes"] for c in clients) + partition_bytes
                                               + model_bytes) / gib, 3),
                  "conclude_pod_gib_evaluating": round(after_conclude_eval / gib, 3),
                  "conclude_pod_gib_otherwise": round(after_conclude / gib, 3),
                  "aggregation_data_bytes": 0,
                  "run_gib": round(after_run / gib, 1)},
    }
    for k, v in res.items():
        if k != "clients":
            print(f"{k}: {v}")
    save_results(Path(args.out), res)


if __name__ == "__main__":
    main()
