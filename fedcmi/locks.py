"""One writer per folder: an exclusive lock with a note of who holds it.

Two ``fedcmi train`` on one output folder would each replace the other's files (and each one's clean-up
of stale temporary files would delete the other's file in flight). A writer takes the folder's lock for as
long as it writes; a second one fails at once with a message naming the holder. The lock is an OS lock
(``flock``) on a small file, so it goes with its process, whatever way that process ends: no stale lock
ever needs removing by hand. Taking a lock this process already holds is a no-op (the CLI and the engine
both take it).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path

from fedcmi.errors import FedcmiError

log = logging.getLogger("fedcmi")
LOCK_NAME = ".fedcmi.lock"
BESIDE_SUFFIX = ".fedcmi-lock"
_held: set[Path] = set()


class Busy(FedcmiError, RuntimeError):
    """Another process is writing where this one was asked to write."""


def inside(folder: str | Path) -> Path:
    """The lock of a folder a writer fills (an output folder, a federation's store)."""
    return Path(folder) / LOCK_NAME


def beside(path: str | Path) -> Path:
    """The lock of a file, or of a folder that is replaced whole (the prepared data): next to it."""
    p = Path(path).resolve()
    return p.with_name(f".{p.name}{BESIDE_SUFFIX}")


def _holder(fd: int) -> str:
    with contextlib.suppress(OSError, ValueError):
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 4096) or b"{}")
        return (f"process {info.get('pid')} on {info.get('host')} since {info.get('since')} "
                f"({info.get('command', '?')})")
    return "another process"


@contextlib.contextmanager
def exclusive(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold ``lock_file`` while the block runs; :class:`Busy` naming the holder if another process has it."""
    path = Path(lock_file).resolve()
    if path in _held:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _take(fd, fcntl.LOCK_EX, path, "a second writer"):
            if _only_readers(fd):
                raise Busy(f"{what} is being read by another fedcmi process (a train, an evaluation, a "
                           "pipeline step); wait for it to finish, or write to another folder")
            raise Busy(f"{what} is in use by {_holder(fd)}; wait for it to finish, or give this run another folder")
        note = {"pid": os.getpid(), "host": socket.gethostname(),
                "since": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                "command": " ".join(Path(sys.argv[0]).name.split() + sys.argv[1:])[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(note).encode(), 0)
        _held.add(path)
        try:
            yield
        finally:
            _held.discard(path)
    finally:
        os.close(fd)  # releases the lock


def _take(fd: int, mode: int, path: Path, unguarded: str) -> bool:
    """Lock ``fd`` in ``mode`` without waiting; False when another process holds it. A file system without
    locks (some network volumes) goes on unguarded, with a warning naming what nothing stops."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        log.warning("cannot lock %s (%s); nothing stops %s there", path, exc.strerror, unguarded)
    return True


def _only_readers(fd: int) -> bool:
    """Whether the lock on ``fd``'s file is held in shared mode only (by readers, see :func:`shared`)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


@contextlib.contextmanager
def shared(lock_file: str | Path, what: str) -> Iterator[None]:
    """Hold ``lock_file`` shared while the block reads what it guards: any number of readers at once, and
    no writer (:func:`exclusive`) meanwhile; :class:`Busy` naming the writer if one is at work."""
    path = Path(lock_file).resolve()
    if path in _held or not path.parent.is_dir():  # this process writes it, or there is nothing to read yet
        yield
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        if not _take(fd, fcntl.LOCK_SH, path, "a writer"):
            raise Busy(f"{what} is being written by {_holder(fd)}; wait for it to finish")
        yield
    finally:
        os.close(fd)
