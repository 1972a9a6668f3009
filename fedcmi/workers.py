"""A round's clients trained side by side in worker processes, folded in client order.

Each worker is a fresh Python process (``python -c``, never a fork of a process
that already runs torch's threads, and never a re-run of the caller's script)
with ``threads`` torch threads and one :class:`~fedcmi.federation.Federation`
over the memory-mapped prepared data, so the page cache holds the data once
whatever the number of workers. Workers live for the whole run and train any
client: the global model of a round is written once to a file they all read,
and each update comes back as one safetensors buffer over the worker's own
socket. A client's training depends only on the global model, the round, the
client and the seed, never on which worker ran it, and :class:`ClientWorkers`
hands the outcomes on in the order asked for, so the aggregate is bitwise the
sequential engine's, for any number of workers.

At most ``2 x workers`` updates are in flight or waiting, so memory does not
grow with the number of clients. A worker that dies (killed, out of memory)
takes only its own client with it: a new worker starts, the client is tried
once more, and if that kills a worker again the round rejects it like any
failed client. A worker exits when the process that started it is gone.
"""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from multiprocessing.connection import Connection, wait
from pathlib import Path
from types import TracebackType

from safetensors.torch import load as load_buffer
from safetensors.torch import load_file, save, save_file

from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.errors import FedcmiError
from fedcmi.federation import Federation
from fedcmi.partition import load_partition
from fedcmi.round.update import (
    ClientFailed,
    ClientUpdate,
    Producer,
    StateDict,
    failure_reason,
    pack_update,
    unpack_tensors,
)

__all__ = ["ClientWorkers", "WorkerError", "resolve_workers", "usable_cpus"]

log = logging.getLogger("fedcmi")
TRIES = 2  # a client whose worker dies this many times is rejected


class WorkerError(FedcmiError, RuntimeError):
    """A worker process could not start (its set-up failed): not one client's fault."""


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a container's
    CPU limit, which a pod's affinity mask does not show)."""
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, int(quota) // int(period))
    except (OSError, ValueError):
        pass
    return max(1, n)


#: ``auto``'s ceiling when clients train on a GPU: each worker holds a CUDA context and its own client's
#: activations on the one device (ResNet18 x2 at CREMA-D shapes peaks at 4.7 GiB in fp32), so four fit a 24 GB card.
GPU_AUTO_CAP = 4


def resolve_workers(cfg: Config, clients: int | None = None) -> int:
    """How many worker processes train a round: ``federation.workers``, or for ``auto`` the usable CPUs over
    ``threads`` (one when ``threads`` is 0, torch's own count, which already takes every core; at most
    :data:`GPU_AUTO_CAP` on a GPU); never more than the clients there are to train."""
    given = cfg.federation.workers
    if given != "auto":
        w = given
    else:
        w = usable_cpus() // cfg.threads if cfg.threads > 0 else 1
        if _on_gpu(cfg):
            w = min(w, GPU_AUTO_CAP)
    return max(1, min(w, cfg.sampled_per_round if clients is None else clients))


def _on_gpu(cfg: Config) -> bool:
    if cfg.device == "cpu":
        return False
    import torch

    return cfg.device == "cuda" or torch.cuda.is_available()


@dataclass
class _Outcome:
    """A client's outcome as it crosses the process boundary: an update as one buffer, nothing, or a failure."""

    client_id: int
    payload: bytes | None = None
    num_examples: int = 0
    modalities: tuple[str, ...] = ()
    metrics: dict = field(default_factory=dict)
    failure: str | None = None


# -- inside a worker process -------------------------------------------------------------------------
def _watch_parent(ppid: int) -> None:
    while os.getppid() == ppid:
        time.sleep(0.5)
    os._exit(1)  # the run that started this worker is gone (killed): stop, even mid-client


def serve(fd: int) -> None:
    """A worker's life: set up from the first message, then train clients until the socket closes."""
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    conn = Connection(fd)
    try:
        cfg, level = conn.recv()
        logging.basicConfig(level=level, format="%(levelname)s %(name)s (worker %(process)d): %(message)s")
        fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    except EOFError:
        return
    except Exception as exc:  # told to the parent, which stops the run with it
        conn.send(("error", f"{exc.__class__.__name__}: {exc}"))
        return
    conn.send(("ready", None))
    current: tuple[str, StateDict] | None = None
    while True:
        try:
            global_file, cid, round_no = conn.recv()
        except EOFError:
            return
        if current is None or current[0] != global_file:
            current = (global_file, load_file(global_file))
        try:
            update = fed.train_client(current[1], cid, round_no)
        except Exception as exc:  # the round rejects it, as the sequential engine does
            outcome = _Outcome(cid, failure=failure_reason(cid, exc))
        else:
            outcome = (_Outcome(cid) if update is None else
                       _Outcome(cid, save(pack_update(update)), update.num_examples, tuple(update.modalities),
                                dict(update.metrics)))
        conn.send(("outcome", outcome))


# -- in the process that runs the round ------------------------------------------------------------------
def _unpack(outcome: _Outcome) -> ClientUpdate | None:
    if outcome.failure is not None:
        raise ClientFailed(outcome.failure)
    if outcome.payload is None:
        return None
    state, extra = unpack_tensors(load_buffer(outcome.payload))
    return ClientUpdate(outcome.client_id, state, outcome.num_examples, outcome.modalities, outcome.metrics, extra)


class _Worker:
    """One worker process and its end of the socket pair; ``client``: the client it is training."""

    def __init__(self, cfg: Config) -> None:
        mine, theirs = socket.socketpair()
        paths = [p for p in sys.path if p]  # the caller's import path, so the worker finds the same fedcmi
        code = f"import sys; sys.path[:0] = {paths!r}; from fedcmi.workers import serve; serve({theirs.fileno()})"
        env = dict(os.environ)
        if cfg.threads > 0:  # before torch loads: its OpenMP pool never starts wider than asked
            env["OMP_NUM_THREADS"] = str(cfg.threads)
        self.proc = subprocess.Popen([sys.executable, "-c", code], pass_fds=(theirs.fileno(),), env=env,
                                     stdin=subprocess.DEVNULL)
        theirs.close()
        self.conn = Connection(mine.detach())
        self.conn.send((cfg, logging.getLogger("fedcmi").getEffectiveLevel()))
        self.client: int | None = None

    def stop(self, kill: bool = False) -> None:
        self.conn.close()  # the worker's next read ends it
        if kill:
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _scratch() -> Path:
    """A folder for the round's global model file: shared memory when the machine has it."""
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="fedcmi-workers-", dir=base))


class ClientWorkers:
    """``n`` worker processes that train clients of any round; close (or use as a context manager) to stop
    them. They start on first use."""

    def __init__(self, cfg: Config, n: int) -> None:
        if n < 1:
            raise ValueError(f"a pool needs at least one worker, got {n}")
        self.cfg = cfg
        self.n = n
        self.window = 2 * n
        self._workers: list[_Worker] = []
        self._dir: Path | None = None
        self._published: tuple[int, Path] | None = None

    def __enter__(self) -> ClientWorkers:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        for w in self._workers:
            w.stop(kill=w.client is not None)  # one still training (a round that raised) is not waited for
        self._workers = []
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def _publish(self, global_state: StateDict, round_no: int) -> Path:
        """Write round ``round_no``'s global model once for every worker (the last round's file goes)."""
        if self._published is not None and self._published[0] == round_no:
            return self._published[1]
        if self._dir is None:
            self._dir = _scratch()
        path = self._dir / f"global_{round_no:06d}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in global_state.items()}, str(path))
        if self._published is not None:
            self._published[1].unlink(missing_ok=True)
        self._published = (round_no, path)
        return path

    def outcomes(self, global_state: StateDict, clients: list[int], round_no: int) -> Iterator[tuple[int, Producer]]:
        """(client id, producer) for each of ``clients`` in the order given, trained ahead in the workers."""
        path = self._publish(global_state, round_no)
        for i, w in enumerate(self._workers):  # still busy with a round its caller gave up on: its answer is stale
            if w.client is not None:
                w.stop(kill=True)
                self._workers[i] = _Worker(self.cfg)
        while len(self._workers) < min(self.n, len(clients)):
            self._workers.append(_Worker(self.cfg))
        todo = deque(clients)
        done: dict[int, _Outcome] = {}
        deaths: dict[int, int] = {}
        for cid in clients:
            while cid not in done:
                busy = sum(w.client is not None for w in self._workers)
                for w in self._workers:
                    if w.client is None and todo and busy + len(done) < self.window:
                        w.client = todo.popleft()
                        busy += 1
                        try:
                            w.conn.send((str(path), w.client, round_no))
                        except OSError:  # it died: collected below like any death
                            pass
                self._collect(done, deaths, todo, round_no)
            yield cid, partial(_unpack, done.pop(cid))

    def _collect(self, done: dict[int, _Outcome], deaths: dict[int, int], todo: deque[int], round_no: int) -> None:
        """Wait for at least one busy worker to answer or die; a dead worker is replaced, its client retried
        first or, at its last try, rejected."""
        busy = {w.conn: w for w in self._workers if w.client is not None}
        for conn in wait(list(busy)):
            w = busy[conn]  # type: ignore[index]
            cid = w.client
            assert cid is not None
            try:
                kind, body = w.conn.recv()
            except (EOFError, OSError, pickle.UnpicklingError):
                code = w.proc.wait()
                deaths[cid] = deaths.get(cid, 0) + 1
                why = f"exit status {code}" if code >= 0 else f"signal {-code}"
                self._workers[self._workers.index(w)] = _Worker(self.cfg)
                if deaths[cid] < TRIES:
                    log.warning("round %d: the worker training client %d died (%s); training it again",
                                round_no, cid, why)
                    todo.appendleft(cid)
                else:
                    done[cid] = _Outcome(cid, failure=f"client {cid}: training failed: its worker process died "
                                                      f"{TRIES} times ({why}: killed, or out of memory)")
                continue
            if kind == "ready":  # set up; its answer is still to come
                continue
            if kind == "error":
                raise WorkerError(f"a worker process could not set up: {body}")
            w.client = None
            done[cid] = body
