"""The in-process engine: rounds of a federation, checkpointed and resumable.

After every round the global model and the ledger are committed atomically (model file first, then
``state.json`` naming it), so a run killed at any point resumes from its last complete round and ends
with exactly the model an uninterrupted run gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.federation import Federation
from fedcmi.io import check_writable, remove_stale_temporaries
from fedcmi.locks import exclusive, inside
from fedcmi.metrics import Evaluation
from fedcmi.partition import load_partition
from fedcmi.round.close import close_round, final_evaluation
from fedcmi.round.ledger import Ledger, checkpoint_folder
from fedcmi.round.outcomes import client_outcomes
from fedcmi.round.record import RoundRecord
from fedcmi.round.schedule import Schedule
from fedcmi.round.sinks import MetricSink
from fedcmi.round.update import StateDict, model_state
from fedcmi.workers import ClientWorkers, resolve_workers

__all__ = ["TrainResult", "train"]

log = logging.getLogger("fedcmi")


@dataclass
class TrainResult:
    state: StateDict
    history: list[RoundRecord]
    final: Evaluation
    resumed_from: int = 0
    seconds: float = 0.0


def _headline(ev: Evaluation, modalities: Sequence[str]) -> dict[str, str]:
    out = {"acc": f"{ev.mm_acc:.3f}"}
    for m in modalities:
        if m in ev.uni_acc:
            out[m[:5]] = f"{ev.uni_acc[m]:.3f}"
    return out


def train(cfg: Config, out_dir: Path | None = None, resume: Literal["auto", "never", "must"] = "auto",
          progress: bool = True, sinks: Sequence[MetricSink] = ()) -> TrainResult:
    """Run ``cfg.federation.rounds`` rounds; resume from ``out_dir/checkpoints`` when it matches. Each
    committed round goes to ``sinks``.

    Holds ``out_dir``'s lock throughout: a second run on the same folder fails at once (:class:`Busy`).
    """
    out_dir = Path(out_dir or cfg.output.dir / "train")
    with exclusive(inside(out_dir), f"the output folder {out_dir}"):
        return _train(cfg, out_dir, resume, progress, sinks)


def _train(cfg: Config, out_dir: Path, resume: Literal["auto", "never", "must"], progress: bool,
           sinks: Sequence[MetricSink]) -> TrainResult:
    t0 = time.perf_counter()
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    ledger = Ledger.of(cfg, check_writable(checkpoint_folder(out_dir)), fed.data)  # fail before training
    remove_stale_temporaries(out_dir)  # a final output whose writer was killed
    resumed = ledger.open(resume, cfg.federation.rounds)
    state = resumed if resumed is not None else fed.initial_state()
    start = ledger.completed
    schedule = Schedule(cfg)
    rounds = cfg.federation.rounds
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=rounds, initial=start, desc=f"{cfg.algorithm.name}", unit="round", dynamic_ncols=True)
    last: Evaluation | None = None
    n_workers = resolve_workers(cfg)
    pool = ClientWorkers(cfg, n_workers) if n_workers > 1 else None
    if pool is not None:
        log.info("training up to %d clients at a time in worker processes of %d thread(s) each", n_workers,
                 torch.get_num_threads())
    try:
        for round_no in range(start + 1, rounds + 1):
            began = time.perf_counter()
            clients = schedule.clients(round_no)
            closed = close_round(fed, state, clients, client_outcomes(fed, state, clients, round_no, pool), round_no,
                                 ledger=ledger, sinks=sinks, workers=n_workers, started=began)
            state = closed.state
            if schedule.is_last(round_no):
                last = closed.evaluation  # the run's final evaluation: the same model, so not computed twice
            if bar is not None:
                bar.update(1)
                if closed.evaluation is not None:
                    bar.set_postfix(_headline(closed.evaluation, cfg.data.modalities))
    finally:
        if pool is not None:
            pool.close()
        if bar is not None:
            bar.close()
    final = final_evaluation(fed, ledger, state, last)
    for sink in sinks:
        sink.log_final(final, ledger.history)
    # the model alone: the server's state (moments, control variates) lives on in the checkpoints
    return TrainResult(model_state(state), ledger.history, final, start, time.perf_counter() - t0)
