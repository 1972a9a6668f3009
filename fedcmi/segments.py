"""A federation run by separate workers, step by step, through a store on disk.

A pipeline (Kubeflow or any other) runs a federation as these steps, each in a
process of its own, in the project root of the data volume (the folder that
holds ``data.prepared_dir`` and ``partition.file``, as after ``dvc repro``):

- :func:`begin`: the global model to continue from (the store's last committed
  round, or the seeded initial model) and the round it stands at.
- :func:`train_worker`: one worker's share of a round's clients
  (:meth:`RoundPolicy.clients_of_worker`). Reads only those clients' rows of the
  memory-mapped train split. A client whose training fails becomes a failure
  record, not a failed worker, so the round rejects it as the engine does.
- :func:`conclude`: folds the workers' updates in client order with
  :meth:`RoundPolicy.conclude`, evaluates on the test split when the schedule
  says so, and commits the round to the store's :class:`Ledger`; a repeated
  call for a committed round (a retried pod) returns what was committed.
- :func:`finish`: the final model and evaluation once every round is committed.

The store is the engine's checkpoint folder (same format, same fingerprint), so
a federation survives the loss of any worker, run or driver, resumes after its
last committed round, and ends with the model the in-process engine gives.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

from fedcmi.algorithms.aggregation import StateDict, model_state
from fedcmi.checkpoint import STATE_FILE, Checkpointer
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.divergence import Diverged
from fedcmi.engine import make_ledger
from fedcmi.evaluation import report_order
from fedcmi.federation import Federation
from fedcmi.io import load_state, read_json, save_state, write_json
from fedcmi.locks import exclusive, inside
from fedcmi.partition import load_partition
from fedcmi.rounds import ForeignCheckpoint, Ledger, RoundPolicy, failure_reason
from fedcmi.update_files import read_update, write_update
from fedcmi.workers import ClientWorkers, resolve_workers

log = logging.getLogger("fedcmi")
FINAL = "final.json"
DIVERGED = "diverged.json"  # a federation the divergence guard stopped: no later run may continue it
MODEL = "model.safetensors"  # the final global model, once the federation is complete


class StoreError(RuntimeError):
    """A store that holds another federation, or is behind the round a step was asked for."""


def resolve_store(store: str, run_name: str, root: Path = Path(".")) -> Path:
    """Where a federation is kept: ``store`` when given, else ``outputs/federations/<run_name>`` under
    ``root`` (the project root on the data volume; the current folder of a pipeline step)."""
    if not store and not run_name:
        raise StoreError("a federation needs a store or a run name to find its store by")
    where = (Path(root) / (store or f"outputs/federations/{run_name}")).resolve()
    if not where.is_relative_to(Path(root).resolve()) or where == Path(root).resolve():
        raise StoreError(f"the store {store or run_name!r} lies outside the data volume's project folder "
                         f"{Path(root).resolve()}; give a relative path inside it")
    return where


def check_within(cfg: Config, root: Path = Path(".")) -> None:
    """Refuse data paths outside the project folder on the data volume (absolute or ``..``): a pipeline's
    steps read only what that volume holds."""
    base = Path(root).resolve()
    for field, value in (("data.prepared_dir", cfg.data.prepared_dir), ("partition.file", cfg.partition.file)):
        if not (base / value).resolve().is_relative_to(base):
            raise StoreError(f"{field} {str(value)!r} lies outside the data volume's project folder {base}; "
                             "a pipeline reads only paths inside it")


def _federation(cfg: Config) -> Federation:
    return Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))


def checkpoints(store: Path) -> Path:
    return Path(store) / "checkpoints"


def _ledger(cfg: Config, store: Path, fed: Federation) -> tuple[Ledger, StateDict | None]:
    """The store's ledger, opened; refuses a store that another federation (other settings or data) wrote."""
    folder = checkpoints(store)
    folder.mkdir(parents=True, exist_ok=True)
    ledger = make_ledger(cfg, folder, fed.data)
    try:  # a store is continued when it has a checkpoint, and never restarted over another federation's
        state = ledger.open("must" if (folder / STATE_FILE).is_file() else "auto", cfg.federation.rounds)
    except ForeignCheckpoint:
        raise StoreError(f"the store {store} holds a federation with other settings or data; give this one a "
                         "store of its own (--store, or another run name)") from None
    return ledger, state


def _check_alive(store: Path) -> None:
    """Fail fast, with the guard's reason, on a federation that diverged (rather than retrying it)."""
    marker = Path(store) / DIVERGED
    if marker.is_file():
        raise Diverged(f"{read_json(marker)['reason']} (this federation stopped in an earlier run; its committed "
                       f"rounds stay in {store}. Start another with other settings and another run name)")


def begin(cfg: Config, store: Path, out: Path) -> int:
    """Write the global model to continue from to ``out``; returns the number of rounds already committed."""
    _check_alive(store)
    fed = _federation(cfg)
    ledger, state = _ledger(cfg, store, fed)
    save_state(out, state if state is not None else fed.initial_state(),
               {"kind": "global", "round": ledger.completed})
    return ledger.completed


def _client_file(cid: int) -> str:
    return f"client_{cid:05d}.safetensors"


def train_worker(cfg: Config, global_model: Path, rnd: int, worker: int, per_worker: int, out_dir: Path,
                 progress: Callable[[str], None] = print) -> list[int]:
    """Train worker ``worker``'s clients of round ``rnd`` from ``global_model``; one file per client in
    ``out_dir`` (an update, a ``skipped`` marker, or a ``failed`` record with the reason). Returns the clients.
    Each client's outcome is printed; a failure is also handed to ``progress``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    policy = RoundPolicy(cfg)
    mine = policy.clients_of_worker(rnd, worker, per_worker) if rnd < cfg.federation.rounds else []
    if not mine:
        return []
    fed = _federation(cfg)
    state, _ = load_state(global_model)
    n = resolve_workers(cfg, len(mine))  # a pod's CPU limit counts (its cgroup quota)
    pool = ClientWorkers(cfg, n) if n > 1 else None
    t0 = time.perf_counter()
    try:
        for cid, produce in fed.outcomes(state, mine, rnd, pool):
            path = out_dir / _client_file(cid)
            try:
                update = produce()
            except Exception as exc:  # the round rejects it, exactly as the engine does; the worker goes on
                reason = failure_reason(cid, exc)
                log.warning("round %d: %s", rnd + 1, reason)
                write_update(path, rnd, cid, None, failure=reason)
                progress(f"round {rnd + 1}: client {cid} failed: {reason}")
                continue
            write_update(path, rnd, cid, update)
            if update is None:
                print(f"round {rnd + 1}: client {cid} has nothing to train")
                continue
            loss = update.metrics.get("loss")
            print(f"round {rnd + 1}: client {cid} trained, {time.perf_counter() - t0:.1f} s into the step"
                  + (f" ({n} workers)" if pool else "")
                  + (f", loss {loss:.4f}" if isinstance(loss, (int, float)) else ""))
    finally:
        if pool is not None:
            pool.close()
    return mine


def _worker_files(worker_dirs: list[Path]) -> dict[int, list[Path]]:
    """The workers' client files by the client id in their names (a name without one is kept under -1)."""
    files: dict[int, list[Path]] = {}
    for d in worker_dirs:
        for p in sorted(Path(d).glob("client_*.safetensors")):
            digits = p.name[len("client_"):-len(".safetensors")]
            files.setdefault(int(digits) if digits.isdigit() and len(digits) < 10 else -1, []).append(p)
    return files


def conclude(cfg: Config, store: Path, global_model: Path, worker_dirs: list[Path], rnd: int, out: Path,
             on_round: Callable[[dict], None] | None = None) -> dict | None:
    """Aggregate round ``rnd`` from the workers' files, evaluate it when scheduled, commit it to the store
    and write the new global model to ``out``. Returns the round's record; None past the last round."""
    if rnd >= cfg.federation.rounds:
        save_state(out, load_state(global_model)[0], {"kind": "global", "round": rnd})
        return None
    with exclusive(inside(store), f"the federation store {store}"):  # one committer, even if a pod is retried
        return _conclude(cfg, store, global_model, worker_dirs, rnd, out, on_round)


def _conclude(cfg: Config, store: Path, global_model: Path, worker_dirs: list[Path], rnd: int, out: Path,
              on_round: Callable[[dict], None] | None) -> dict | None:
    t0 = time.perf_counter()
    _check_alive(store)
    fed = _federation(cfg)
    ledger, committed = _ledger(cfg, store, fed)
    if ledger.completed == rnd + 1 and committed is not None:  # a retried step: the round is already in
        if rnd + 1 == cfg.federation.rounds and (Path(store) / FINAL).is_file():
            ledger.finish(read_json(Path(store) / FINAL)["metrics"]["mm_acc"])
        save_state(out, committed, {"kind": "global", "round": rnd + 1})
        return ledger.history[-1]
    if ledger.completed != rnd:
        raise StoreError(f"the store {store} has {ledger.completed} rounds committed; round {rnd + 1} cannot "
                         "be concluded now (was another run writing to it?)")
    state, _ = load_state(global_model)
    policy = fed.policy
    files = _worker_files(worker_dirs)
    expected = policy.clients(rnd)
    if sorted(files) != expected or any(len(v) > 1 for v in files.values()):
        raise StoreError(f"round {rnd + 1}: the workers returned files for clients "
                         f"{sorted(c for c, v in files.items() for _ in v)}, expected {expected}")
    try:
        producers = [(cid, partial(read_update, files[cid][0], rnd, cid)) for cid in expected]
        res = policy.conclude(fed.strategy, fed.model, state, producers, rnd, fed.partition)
        res.clients = expected
        ev = fed.evaluate(res.state, probe=policy.probes(rnd)) if policy.evaluates(rnd) else None
        rec = policy.record(rnd, res, ev.metrics if ev else None, time.perf_counter() - t0)
        ledger.commit(res.state, rec, on_round)
        if rnd + 1 == cfg.federation.rounds and ev is not None:
            write_json(Path(store) / FINAL, {"metrics": ev.metrics, "confusion": ev.confusion})
            ledger.finish(ev.metrics["mm_acc"])  # as the engine: the last round is committed, the run still fails
    except Diverged as exc:  # deterministic: no retry or later run may spend a GPU on it again
        write_json(Path(store) / DIVERGED, {"round": rnd + 1, "reason": str(exc)})
        raise
    save_state(out, res.state, {"kind": "global", "round": rnd + 1})
    return rec


def status(cfg: Config, store: Path) -> dict:
    """How far the federation in ``store`` is: rounds committed and whether it is complete."""
    meta = Checkpointer(checkpoints(store), cfg.output.keep_checkpoints).load()
    done = int(meta["completed_rounds"]) if meta else 0
    return {"completed_rounds": done, "rounds": cfg.federation.rounds, "complete": done >= cfg.federation.rounds}


def finish(cfg: Config, store: Path, out_model: Path) -> dict | None:
    """The final model (to ``out_model``), its metrics and confusion matrix, once every round is committed;
    None while rounds remain."""
    fed = _federation(cfg)
    ledger, state = _ledger(cfg, store, fed)
    if ledger.completed < cfg.federation.rounds or state is None:
        return None
    final_file = Path(store) / FINAL
    final = read_json(final_file) if final_file.is_file() else None
    if final is None:  # the last round was committed, and its step stopped before writing final.json
        ev = fed.evaluate(state, probe=cfg.evaluation.linear_probe)
        final = {"metrics": ev.metrics, "confusion": ev.confusion}
        write_json(final_file, final)
    meta = {"kind": "global", "round": cfg.federation.rounds, "algorithm": cfg.algorithm.name}
    state = model_state(state)  # the server's state stays in the store's checkpoints
    save_state(Path(store) / MODEL, state, meta)
    save_state(out_model, state, meta)
    write_json(Path(store) / "history.json", ledger.history)
    write_json(Path(store) / "metrics.json", report_order(final["metrics"]), sort_keys=False)
    return {**final, "history": ledger.history, "class_names": list(fed.data.spec.class_names)}
