"""A federation run by separate processes, step by step, around a store on disk.

A pipeline (Kubeflow or any other) runs a federation as these steps, each in a process of its own, in
the project root of the data volume (the folder that holds ``data.prepared_dir`` and ``partition.file``,
as after ``dvc repro``):

- :func:`begin`: the global model to continue from (the store's last committed round, or the seeded
  initial model) and the number of rounds committed.
- :func:`train_worker`: one worker's share of a round's clients (:meth:`Schedule.clients_of_worker`).
  Reads only those clients' rows of the memory-mapped train split. A client whose training fails becomes a
  failure record, not a failed worker, so the round rejects it as the engine does; a client the latency
  model finds late is not trained and becomes a ``late`` marker.
- :func:`conclude`: :func:`~fedcmi.round.close.close_round` over the workers' files; a repeated call for a
  committed round (a retried pod) returns what was committed.
- :func:`finish`: the final model and evaluation once every round is committed.

The store holds the federation's ledger (the engine's checkpoint format and fingerprint), so a federation
survives the loss of any worker, run or driver, resumes after its last committed round, and ends with the
model the in-process engine gives.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Concatenate, ParamSpec, TypeVar

from fedcmi.checkpoint import STATE_FILE
from fedcmi.config import Config
from fedcmi.data import DataModule, reading
from fedcmi.divergence import Diverged
from fedcmi.errors import FedcmiError
from fedcmi.federation import Federation
from fedcmi.io import load_state, read_json, save_state, write_json
from fedcmi.locks import exclusive, inside
from fedcmi.metrics import Evaluation
from fedcmi.outputs import HISTORY, METRICS, write_metrics
from fedcmi.partition import load_partition
from fedcmi.round.close import close_round, final_evaluation
from fedcmi.round.ledger import ForeignCheckpoint, Ledger, checkpoint_folder
from fedcmi.round.outcomes import client_outcomes
from fedcmi.round.record import RoundRecord
from fedcmi.round.schedule import Schedule
from fedcmi.round.sinks import MetricSink
from fedcmi.round.update import StateDict, UpdateLate, failure_reason, model_state
from fedcmi.round.update_files import read_update, write_update
from fedcmi.workers import ClientWorkers, resolve_workers

log = logging.getLogger("fedcmi")
FINAL = "final.json"
FINAL_VAL = "final_val.json"  # the final model on the validation split, where the data has one
DIVERGED = "diverged.json"  # a federation the divergence guard stopped: no later run may continue it
MODEL = "model.safetensors"  # the final global model, once the federation is complete


P = ParamSpec("P")
R = TypeVar("R")


def _reads_data(step: Callable[Concatenate[Config, P], R]) -> Callable[Concatenate[Config, P], R]:
    """A step that holds the prepared data against a ``prepare`` while it runs (as the CLI's commands do)."""

    @functools.wraps(step)
    def held(cfg: Config, *args: P.args, **kwargs: P.kwargs) -> R:
        with reading(cfg.data.prepared_dir):
            return step(cfg, *args, **kwargs)

    return held


class StoreError(FedcmiError, RuntimeError):
    """A store that holds another federation, or is behind the round a step was asked for."""


class StoreRefused(StoreError):
    """A store or path that every retry would meet again: outside the data volume, another federation's,
    or behind the rounds its earlier runs committed (removed or replaced since)."""

    retry_helps = False


def resolve_store(store: str, run_name: str, root: Path = Path(".")) -> Path:
    """Where a federation is kept: ``store`` when given, else ``outputs/federations/<run_name>`` under
    ``root`` (the project root on the data volume; the current folder of a pipeline step)."""
    if not store and not run_name:
        raise StoreRefused("a federation needs a store or a run name to find its store by")
    where = (Path(root) / (store or f"outputs/federations/{run_name}")).resolve()
    if not where.is_relative_to(Path(root).resolve()) or where == Path(root).resolve():
        raise StoreRefused(f"the store {store or run_name!r} lies outside the data volume's project folder "
                         f"{Path(root).resolve()}; give a relative path inside it")
    return where


def check_within(cfg: Config, root: Path = Path(".")) -> None:
    """Refuse data paths outside the project folder on the data volume (absolute or ``..``): a pipeline's
    steps read only what that volume holds."""
    base = Path(root).resolve()
    for field, value in (("data.prepared_dir", cfg.data.prepared_dir), ("partition.file", cfg.partition.file)):
        if not (base / value).resolve().is_relative_to(base):
            raise StoreRefused(f"{field} {str(value)!r} lies outside the data volume's project folder {base}; "
                             "a pipeline reads only paths inside it")


def _federation(cfg: Config) -> Federation:
    return Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))


def _ledger(cfg: Config, store: Path, fed: Federation) -> tuple[Ledger, StateDict | None]:
    """The store's ledger, opened; refuses a store that another federation (other settings or data) wrote."""
    folder = checkpoint_folder(store)
    folder.mkdir(parents=True, exist_ok=True)
    ledger = Ledger.of(cfg, folder, fed.data)
    try:  # a store is continued when it has a checkpoint, and never restarted over another federation's
        state = ledger.open("must" if (folder / STATE_FILE).is_file() else "auto", cfg.federation.rounds)
    except ForeignCheckpoint:
        raise StoreRefused(f"the store {store} holds a federation with other settings or data; give this one a "
                         "store of its own (--store, or another run name)") from None
    return ledger, state


def _check_alive(store: Path) -> None:
    """Fail fast, with the guard's reason, on a federation that diverged (rather than retrying it)."""
    marker = Path(store) / DIVERGED
    if marker.is_file():
        raise Diverged(f"{read_json(marker)['reason']} (this federation stopped in an earlier run; its committed "
                       f"rounds stay in {store}. Start another with other settings and another run name)")


@_reads_data
def begin(cfg: Config, store: Path, out: Path, expect: int = 0) -> int:
    """Write the global model to continue from to ``out``; returns the number of rounds already committed.

    ``expect`` is the number of rounds that whoever submitted this run knows were committed by the
    federation's earlier runs (the driver's successful runs); a store behind it was removed or replaced,
    and continuing would restart the federation while the driver counts it half done.
    """
    _check_alive(store)
    fed = _federation(cfg)
    ledger, state = _ledger(cfg, store, fed)
    if ledger.completed < expect:
        raise StoreRefused(f"the store {store} holds {ledger.completed} committed rounds, behind the {expect} "
                           "that this federation's earlier runs committed: it was removed or replaced since. "
                           "Give the federation's own store, or delete the driver's state file to start over")
    save_state(out, state if state is not None else fed.initial_state(),
               {"kind": "global", "round": ledger.completed})
    return ledger.completed


def client_file(cid: int) -> str:
    return f"client_{cid:05d}.safetensors"


@_reads_data
def train_worker(cfg: Config, global_model: Path, round_no: int, worker: int, per_worker: int, out_dir: Path,
                 progress: Callable[[str], None] = print) -> list[int]:
    """Train worker ``worker``'s clients of round ``round_no`` from ``global_model``; one file per client in
    ``out_dir`` (an update, a ``skipped`` marker, or a ``failed`` record with the reason). Returns the clients.
    Each client's outcome is printed; a failure is also handed to ``progress``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schedule = Schedule(cfg)
    mine = schedule.clients_of_worker(round_no, worker, per_worker) if round_no <= schedule.rounds else []
    if not mine:
        return []
    sampled = schedule.clients(round_no)  # the latency model's verdict is over the whole sample
    fed = _federation(cfg)
    state, _ = load_state(global_model, checked=True)
    n = resolve_workers(cfg, len(mine))  # a pod's CPU limit counts (its cgroup quota)
    pool = ClientWorkers(cfg, n) if n > 1 else None
    t0 = time.perf_counter()
    try:
        for cid, produce in client_outcomes(fed, state, mine, round_no, pool, sampled):
            path = out_dir / client_file(cid)
            try:
                update = produce()
            except UpdateLate as exc:  # not trained: the round closes without it
                write_update(path, round_no, cid, None, late=str(exc))
                print(f"round {round_no}: {exc}")
                continue
            except Exception as exc:  # the round rejects it, exactly as the engine does; the worker goes on
                reason = failure_reason(cid, exc)
                log.warning("round %d: %s", round_no, reason)
                write_update(path, round_no, cid, None, failure=reason)
                progress(f"round {round_no}: client {cid} failed: {reason}")
                continue
            write_update(path, round_no, cid, update)
            if update is None:
                print(f"round {round_no}: client {cid} has nothing to train")
                continue
            loss = update.metrics.get("loss")
            print(f"round {round_no}: client {cid} trained, {time.perf_counter() - t0:.1f} s into the step"
                  + (f" ({n} workers)" if pool else "")
                  + (f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""))
    finally:
        if pool is not None:
            pool.close()
    return mine


def _worker_files(worker_dirs: Sequence[Path]) -> dict[int, list[Path]]:
    """The workers' client files by the client id in their names (a name without one is kept under -1)."""
    files: dict[int, list[Path]] = {}
    for d in worker_dirs:
        for p in sorted(Path(d).glob("client_*.safetensors")):
            digits = p.name[len("client_"):-len(".safetensors")]
            files.setdefault(int(digits) if digits.isdigit() and len(digits) < 10 else -1, []).append(p)
    return files


@_reads_data
def conclude(cfg: Config, store: Path, global_model: Path, worker_dirs: Sequence[Path], round_no: int, out: Path,
             sinks: Sequence[MetricSink] = ()) -> RoundRecord | None:
    """Close round ``round_no`` from the workers' files, commit it to the store and write the new global
    model to ``out``. Returns the round's record; None past the last round."""
    if round_no > cfg.federation.rounds:
        save_state(out, load_state(global_model, checked=True)[0], {"kind": "global", "round": round_no - 1})
        return None
    with exclusive(inside(store), f"the federation store {store}"):  # one committer, even if a pod is retried
        return _conclude(cfg, store, global_model, worker_dirs, round_no, out, sinks)


def _conclude(cfg: Config, store: Path, global_model: Path, worker_dirs: Sequence[Path], round_no: int, out: Path,
              sinks: Sequence[MetricSink]) -> RoundRecord | None:
    t0 = time.perf_counter()
    _check_alive(store)
    fed = _federation(cfg)
    ledger, committed = _ledger(cfg, store, fed)
    last = round_no == cfg.federation.rounds
    if ledger.completed == round_no and committed is not None:  # a retried step: the round is already in
        if last and (Path(store) / FINAL).is_file():
            ledger.finish(_read_final(store).mm_acc)
        save_state(out, committed, {"kind": "global", "round": round_no})
        return ledger.history[-1]
    if ledger.completed != round_no - 1:
        raise StoreError(f"the store {store} has {ledger.completed} rounds committed; round {round_no} cannot "
                         "be concluded now (was another run writing to it?)")
    state, _ = load_state(global_model, checked=True)
    files = _worker_files(worker_dirs)
    expected = Schedule(cfg).clients(round_no)
    if sorted(files) != expected or any(len(v) > 1 for v in files.values()):
        raise StoreError(f"round {round_no}: the workers returned files for clients "
                         f"{sorted(c for c, v in files.items() for _ in v)}, expected {expected}")
    try:
        outcomes = [(cid, partial(read_update, files[cid][0], round_no, cid)) for cid in expected]
        closed = close_round(fed, state, expected, outcomes, round_no, ledger=ledger, sinks=sinks, started=t0,
                             keep_final=partial(_write_final, store))
    except Diverged as exc:  # deterministic: no retry or later run may spend a GPU on it again
        write_json(Path(store) / DIVERGED, {"round": round_no, "reason": str(exc)})
        raise
    save_state(out, closed.state, {"kind": "global", "round": round_no})
    return closed.record


def _write_final(store: Path, ev: Evaluation) -> None:
    write_json(Path(store) / FINAL, {"metrics": ev.flat(), "confusion": ev.confusion})


def _read_final(store: Path) -> Evaluation:
    raw = read_json(Path(store) / FINAL, expect=dict)
    ev = Evaluation.from_flat(raw.get("metrics", {}))
    if ev is None:
        raise StoreError(f"{Path(store) / FINAL} is damaged (no mm_acc); remove it and run the finish step again")
    ev.confusion = raw.get("confusion", [])
    return ev


def status(cfg: Config, store: Path) -> dict:
    """How far the federation in ``store`` is: rounds committed and whether it is complete."""
    done = Ledger.committed_in(checkpoint_folder(store))
    return {"completed_rounds": done, "rounds": cfg.federation.rounds, "complete": done >= cfg.federation.rounds}


@_reads_data
def finish(cfg: Config, store: Path, out_model: Path, sinks: Sequence[MetricSink] = ()) -> Evaluation | None:
    """The final model (to ``out_model`` and the store), its evaluation and the store's history and metrics
    files, once every round is committed; None while rounds remain. ``sinks`` get the final evaluation."""
    fed = _federation(cfg)
    ledger, state = _ledger(cfg, store, fed)
    if ledger.completed < cfg.federation.rounds or state is None:
        return None
    if (Path(store) / FINAL).is_file():
        final = _read_final(store)
    else:  # the last round was committed, and its step stopped before writing final.json
        final = final_evaluation(fed, ledger, state)
        _write_final(store, final)
    if fed.data.val is not None and not (Path(store) / FINAL_VAL).is_file():  # what chooses settings
        write_json(Path(store) / FINAL_VAL, {"metrics": fed.evaluate(state, split="val").flat()})
    meta = {"kind": "global", "round": cfg.federation.rounds, "algorithm": cfg.algorithm.name}
    weights = model_state(state)  # the server's state stays in the store's checkpoints
    save_state(Path(store) / MODEL, weights, meta)
    save_state(out_model, weights, meta)
    write_json(Path(store) / HISTORY, [r.to_json() for r in ledger.history])
    write_metrics(Path(store) / METRICS, final)
    for sink in sinks:
        sink.log_final(final, ledger.history)
    return final


def final_figures(cfg: Config, store: Path) -> tuple[dict, dict | None, list[RoundRecord]]:
    """A complete federation's final test figures, its validation figures (None without a validation
    split) and its rounds, as :func:`finish` left them in ``store``."""
    if not status(cfg, store)["complete"] or not (Path(store) / FINAL).is_file():
        raise StoreError(f"the federation in {store} is not finished; drive it to its last round first")
    fed = _federation(cfg)
    ledger, _ = _ledger(cfg, store, fed)
    val = read_json(Path(store) / FINAL_VAL, expect=dict)["metrics"] if (Path(store) / FINAL_VAL).is_file() else None
    return read_json(Path(store) / FINAL, expect=dict)["metrics"], val, list(ledger.history)
