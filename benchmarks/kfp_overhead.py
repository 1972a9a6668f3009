"""Per-round overhead of a local Kubeflow pipeline run against the in-process engine.

    python benchmarks/kfp_overhead.py --rounds 3

Same params, seed and data for both (params.yaml with --rounds); the pipeline
runs through kfp.local's subprocess runner, one process per component. Prints
the figures and writes them to benchmarks/results/kfp_overhead.json.
"""

import argparse
import os
import tempfile
import time
from pathlib import Path

from common import ROOT, SPEED_SETTING, save_results  # noqa: E402  (puts the project on the path)

import torch  # noqa: E402

from fedcmi.config import load_config  # noqa: E402
from fedcmi.data import DataModule, prepare  # noqa: E402
from fedcmi.engine import train  # noqa: E402
from fedcmi.io import load_state  # noqa: E402
from fedcmi.partition import make_partition, save_partition  # noqa: E402
from pipelines.federated import run_local  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--set", dest="extra", action="append", default=[])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kfp_overhead.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        cfg = load_config(args.params, [*SPEED_SETTING, f"federation.rounds={args.rounds}",
                                        "tracking.enabled=false",
                                        "evaluation.linear_probe=false", *args.extra])
        prepare(cfg)
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes),
                       cfg.partition.file)
        t0 = time.perf_counter()
        engine = train(cfg, progress=False)
        t_engine = time.perf_counter() - t0
        t0 = time.perf_counter()
        final = run_local(cfg, tmp, Path(tmp) / "kfp_root")
        t_pipe = time.perf_counter() - t0
        state, _ = load_state(final)
        bitwise = all(torch.equal(state[k], engine.state[k]) for k in state)
    res = {
        "rounds": args.rounds, "clients_per_round": cfg.federation.clients_per_round,
        "engine_seconds": round(t_engine, 2), "pipeline_seconds": round(t_pipe, 2),
        "engine_seconds_per_round": round(t_engine / args.rounds, 2),
        "pipeline_seconds_per_round": round(t_pipe / args.rounds, 2),
        "overhead_seconds_per_round": round((t_pipe - t_engine) / args.rounds, 2),
        "final_models_bitwise_equal": bitwise,
    }
    for k, v in res.items():
        print(f"{k}: {v}")
    save_results(Path(args.out), res)


if __name__ == "__main__":
    main()
