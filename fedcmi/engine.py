"""The in-process simulation: rounds of :class:`Federation`, checkpointed and resumable.

After every round the global model and the engine state are committed
atomically (model file first, then ``state.json`` naming it), so a run killed
at any point resumes from its last complete round and ends with exactly the
model an uninterrupted run gives.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fedcmi.algorithms.aggregation import StateDict, model_state
from fedcmi.checkpoint import Checkpointer, ResumeError
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.divergence import DivergenceGuard, chance_accuracy
from fedcmi.evaluation import report_order
from fedcmi.federation import Federation
from fedcmi.io import check_writable, remove_stale_temporaries, save_state, write_json
from fedcmi.locks import exclusive, inside
from fedcmi.partition import load_partition
from fedcmi.rounds import Ledger
from fedcmi.workers import ClientWorkers, resolve_workers

__all__ = ["Checkpointer", "ResumeError", "TrainResult", "make_ledger", "run_fingerprint", "train", "write_outputs"]

log = logging.getLogger("fedcmi")
RoundCallback = Callable[[dict], None]


@dataclass
class TrainResult:
    state: StateDict
    history: list[dict]
    final: dict[str, float]
    confusion: list[list[int]]
    resumed_from: int = 0
    seconds: float = 0.0


def run_fingerprint(cfg: Config, partition_file: Path, data_meta: dict) -> str:
    """What must match for a checkpoint to be resumed: everything but the round count and reporting."""
    d = cfg.to_dict()
    fed = dict(d["federation"])
    fed.pop("rounds")
    fed.pop("workers")  # how many processes train a round does not change its model
    keep = {k: d[k] for k in ("seed", "device", "threads", "data", "partition", "model", "optim", "server",
                             "algorithm")}
    keep["federation"] = fed
    keep["partition_file"] = hashlib.sha256(Path(partition_file).read_bytes()).hexdigest()
    keep["data_meta"] = data_meta
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:20]


def make_ledger(cfg: Config, folder: Path, data: DataModule) -> Ledger:
    """The ledger of the federation ``cfg`` describes, kept in ``folder``: its fingerprint covers the
    settings, the partition file and the prepared data; its guard knows the test split's chance level."""
    guard = DivergenceGuard(chance_accuracy(data.test.labels, data.spec.num_classes), cfg.optim.lr,
                            cfg.evaluation.divergence_patience, cfg.evaluation.divergence_margin)
    return Ledger(folder, cfg.output.keep_checkpoints, run_fingerprint(cfg, cfg.partition.file, data.meta), guard)


def _headline(rec: dict, modalities) -> dict[str, str]:
    out = {"acc": f"{rec['mm_acc']:.3f}"}
    for m in modalities:
        if f"uni_acc_{m}" in rec:
            out[m[:5]] = f"{rec[f'uni_acc_{m}']:.3f}"
    return out


def train(
    cfg: Config,
    out_dir: Path | None = None,
    resume: Literal["auto", "never", "must"] = "auto",
    progress: bool = True,
    on_round: RoundCallback | None = None,
) -> TrainResult:
    """Run ``cfg.federation.rounds`` rounds; resume from ``out_dir/checkpoints`` when it matches.

    Holds ``out_dir``'s lock throughout: a second run on the same folder fails at once (:class:`Busy`).
    """
    out_dir = Path(out_dir or cfg.output.dir / "train")
    with exclusive(inside(out_dir), f"the output folder {out_dir}"):
        return _train(cfg, out_dir, resume, progress, on_round)


def _train(cfg: Config, out_dir: Path, resume: Literal["auto", "never", "must"], progress: bool,
           on_round: RoundCallback | None) -> TrainResult:
    t0 = time.perf_counter()
    data = DataModule(cfg.data.prepared_dir)
    partition = load_partition(cfg.partition.file)
    fed = Federation(cfg, data, partition)
    ledger = make_ledger(cfg, check_writable(out_dir / "checkpoints"), data)  # fail before training
    remove_stale_temporaries(out_dir)  # a final output whose writer was killed
    resumed = ledger.open(resume, cfg.federation.rounds)
    state = resumed if resumed is not None else fed.initial_state()
    start = ledger.completed
    policy = fed.policy
    rounds = cfg.federation.rounds
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds, initial=start, desc=f"{cfg.algorithm.name}", unit="round", dynamic_ncols=True)
    final = None
    n_workers = resolve_workers(cfg)
    pool = ClientWorkers(cfg, n_workers) if n_workers > 1 else None
    if pool is not None:
        log.info("training up to %d clients at a time in worker processes of %d thread(s) each", n_workers,
                 torch.get_num_threads())
    try:
        for rnd in range(start, rounds):
            tr = time.perf_counter()
            res = fed.run_round(state, rnd, pool)
            state = res.state
            ev = fed.evaluate(state, probe=policy.probes(rnd)) if policy.evaluates(rnd) else None
            if rnd + 1 == rounds:
                final = ev  # the run's final evaluation: the same model, so not computed twice
            rec = policy.record(rnd, res, ev.metrics if ev else None, time.perf_counter() - tr, n_workers)
            ledger.commit(state, rec, on_round)
            if bar is not None:
                bar.update(1)
                if "mm_acc" in rec:
                    bar.set_postfix(_headline(rec, cfg.data.modalities))
    finally:
        if pool is not None:
            pool.close()
        if bar is not None:
            bar.close()

    if final is None:  # resumed after the last round: nothing ran, so evaluate what the checkpoint holds
        final = fed.evaluate(state, probe=cfg.evaluation.linear_probe)
    ledger.finish(final.metrics["mm_acc"])
    history = ledger.history
    # the model alone: the server's state (moments, control variates) lives on in the checkpoints
    return TrainResult(model_state(state), history, final.metrics, final.confusion, start,
                       time.perf_counter() - t0)


CURVE_KEYS = ("mm_acc", "uni_acc_", "path_acc_", "worst_class_acc", "mm_f1", "train_loss")


def curve_rows(history: list[dict]) -> list[dict]:
    """The evaluated rounds with the same keys in every row (what `dvc plots` draws; it drops a file whose
    rows differ): the round and the accuracy figures every evaluated round has."""
    rows = [r for r in history if "mm_acc" in r]
    if not rows:
        return []
    keys = [k for k in rows[0] if k != "round" and k.startswith(CURVE_KEYS) and all(k in r for r in rows)
            and isinstance(rows[0][k], (int, float))]
    return [{"round": r["round"], **{k: r[k] for k in sorted(keys)}} for r in rows]


def write_outputs(result: TrainResult, cfg: Config, out_dir: Path | None = None) -> dict[str, Path]:
    """The run's files: final model, per-round history, final metrics."""
    out_dir = Path(out_dir or cfg.output.dir / "train")
    paths = {
        "model": save_state(out_dir / "model.safetensors", result.state,
                            {"kind": "global", "round": cfg.federation.rounds, "algorithm": cfg.algorithm.name}),
        "history": write_json(out_dir / "history.json", result.history),
        "metrics": write_json(out_dir / "metrics.json", report_order(result.final), sort_keys=False),
        "curves_json": write_json(out_dir / "curves.json", curve_rows(result.history)),
    }
    return paths
