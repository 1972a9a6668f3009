"""Engine overhead: N rounds through fedcmi's engine against a bare PyTorch loop doing the same local steps.

    python benchmarks/engine_overhead.py --rounds 10 --repeats 3

Both run FedAvg on the default synthetic data (params.yaml): the same model
class, the same sampled clients, the same batches in the same order, the same
seeds. The bare loop is what one would write by hand: load the global state,
SGD over the client's batches, a weighted float64 mean. The script checks that
both end with bitwise the same global model, so the work is identical and the
time difference is the engine's own (strategy dispatch, update checks,
per-round checkpoints written and fsynced, history). Evaluation runs once, at
the end, in both. Prints the figures and writes benchmarks/results/engine_overhead.json.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from common import RESULTS, ROOT, SPEED_SETTING, ensure_data, save_results

from fedcmi.algorithms import build_model
from fedcmi.checkpoint import Checkpointer
from fedcmi.config import load_config
from fedcmi.partition import load_partition
from fedcmi.round.schedule import sample_clients
from fedcmi.runners.engine import train
from fedcmi.seeds import derive_seed


def bare_loop(cfg, dm) -> tuple[dict, float]:
    """FedAvg by hand, with nothing of fedcmi's round machinery; returns the final state and test accuracy."""
    part = load_partition(cfg.partition.file)
    model = build_model(cfg, dm.spec)
    glob = {k: v.detach().clone() for k, v in model.state_dict().items()}
    o, fed = cfg.optim, cfg.federation
    feats = {m: dm.train.features[m] for m in dm.spec.modalities}
    labels = dm.train.labels
    for rnd in range(fed.rounds):
        sums: dict[str, torch.Tensor] = {}
        total = 0.0
        for cid in sample_clients(cfg, rnd + 1):  # rounds count from 1; seeds count the rounds before
            idx = part.clients[cid].indices
            model.load_state_dict(glob)
            model.train()
            torch.manual_seed(derive_seed(cfg.seed, rnd, cid))
            opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
            for epoch in range(fed.local_epochs):
                order = idx[np.random.default_rng(derive_seed(cfg.seed, rnd, cid, epoch)).permutation(len(idx))]
                for start in range(0, len(order), fed.batch_size):
                    b = order[start:start + fed.batch_size]
                    x = {m: torch.from_numpy(np.ascontiguousarray(a[b])) for m, a in feats.items()}
                    y = torch.from_numpy(np.ascontiguousarray(labels[b]))
                    loss = F.cross_entropy(model(x).mm_logits, y)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
            w = float(len(idx))
            for k, v in model.state_dict().items():
                if v.is_floating_point():
                    sums[k] = sums.get(k, 0) + v.detach().double() * w
            total += w
        glob = {k: (sums[k] / total).to(v.dtype) if k in sums else v for k, v in glob.items()}
    model.load_state_dict(glob)
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(dm.test), cfg.evaluation.batch_size):
            b = np.arange(start, min(start + cfg.evaluation.batch_size, len(dm.test)))
            x = {m: torch.from_numpy(np.ascontiguousarray(dm.test.features[m][b])) for m in dm.spec.modalities}
            correct += int((model(x).mm_logits.argmax(1).numpy() == dm.test.labels[b]).sum())
    return glob, correct / len(dm.test)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", default=str(ROOT / "params.yaml"))
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS / "engine_overhead.json"))
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fedcmi-overhead-"))
    cfg = load_config(args.params, [
        *SPEED_SETTING, "algorithm.name=fedavg", f"federation.rounds={args.rounds}",
        f"evaluation.every={args.rounds}",
        "evaluation.linear_probe=false", "tracking.enabled=false", f"data.prepared_dir={work}/prepared",
        f"partition.file={work}/partition.json", f"output.dir={work}/out"])
    dm = ensure_data(cfg)

    saves: list[float] = []
    real_save = Checkpointer.save

    def timed_save(self, *a, **k):
        t = time.perf_counter()
        real_save(self, *a, **k)
        saves.append(time.perf_counter() - t)

    Checkpointer.save = timed_save  # measured, not skipped: the engine's checkpoints are part of its cost
    engine_s, bare_s, ckpt_s = [], [], []
    for rep in range(args.repeats):  # alternate, so drift in the machine hits both alike
        saves.clear()
        t0 = time.perf_counter()
        res = train(cfg, work / f"run{rep}", resume="never", progress=False)
        engine_s.append(time.perf_counter() - t0)
        ckpt_s.append(sum(saves))
        t0 = time.perf_counter()
        state, acc = bare_loop(cfg, dm)
        bare_s.append(time.perf_counter() - t0)
        same = all(torch.equal(res.state[k], state[k]) for k in state)
        print(f"repeat {rep}: engine {engine_s[-1]:.2f}s (checkpoints {ckpt_s[-1]:.2f}s), bare loop {bare_s[-1]:.2f}s, "
              f"same final model: {same}, accuracy {res.final.mm_acc:.3f} / {acc:.3f}", flush=True)
        if not same:
            raise SystemExit("the engine and the bare loop disagree: the comparison is not of the same work")
    e, b, c = statistics.median(engine_s), statistics.median(bare_s), statistics.median(ckpt_s)
    figures = {"rounds": args.rounds, "clients_per_round": cfg.federation.clients_per_round,
               "engine_seconds": round(e, 3), "bare_loop_seconds": round(b, 3), "ratio": round(e / b, 4),
               "engine_checkpoint_seconds": round(c, 3), "ratio_without_checkpoints": round((e - c) / b, 4),
               "repeats": {"engine": engine_s, "bare_loop": bare_s, "checkpoints": ckpt_s},
               "same_final_model": True}
    print(f"engine / bare loop = {figures['ratio']} (median of {args.repeats}); "
          f"{figures['ratio_without_checkpoints']} without the per-round checkpoints ({c:.2f}s)")
    save_results(Path(args.out), figures)


if __name__ == "__main__":
    main()
