"""Checkpoints of a federation: one model file per committed round and ``state.json`` naming the newest.

Shared by every executor (the in-process engine and the pipeline's store), so a run
stopped on one path resumes with the same rules on any.

Each round file is whole on its own: its checksummed metadata holds the run's
fingerprint (the settings and data it was made with), the run's id (one per
fresh start), the round and the history up to it. ``state.json`` is the index
that names the newest; when it is damaged, the newest good round file of the
same fingerprint takes its place. Pruning removes only older files of the run
being written, so the newest good checkpoint of the current run is never lost,
and files of another run are left alone.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcmi.errors import FedcmiError
from fedcmi.io import (
    ModelFileError,
    load_state,
    read_json,
    read_state_meta,
    remove_stale_temporaries,
    save_state,
    write_json,
)

StateDict = dict[str, torch.Tensor]
log = logging.getLogger("fedcmi")
STATE_FILE = "state.json"
ENGINE_FORMAT = "fedcmi-engine/1"
PATTERN = "round_*.safetensors"


class ResumeError(FedcmiError, RuntimeError):
    """A checkpoint that cannot be resumed under the current settings."""


class DamagedIndex(ResumeError):
    """A ``state.json`` that is not what this module writes."""


def new_run_id() -> str:
    return secrets.token_hex(6)


@dataclass(frozen=True)
class Index:
    """What ``state.json`` says: the newest committed round of one run."""

    completed: int
    model_file: str
    fingerprint: str
    history: list[dict]
    run_id: str = ""

    @classmethod
    def parse(cls, raw: Any, where: Path) -> Index:
        """Check every field, so a hand-edited or damaged file is one :class:`DamagedIndex`, never a KeyError."""
        if not isinstance(raw, dict) or raw.get("format") != ENGINE_FORMAT:
            raise DamagedIndex(f"{where} is not a fedcmi engine state")
        done, name, fp, hist = (raw.get(k) for k in ("completed_rounds", "model_file", "fingerprint", "history"))
        problems = []
        if not isinstance(done, int) or isinstance(done, bool) or not 0 < done < 10**9:
            problems.append(f"completed_rounds {done!r}")
        if not isinstance(name, str) or Path(name).name != name or not name.startswith("round_"):
            problems.append(f"model_file {name!r}")
        if not isinstance(fp, str) or not fp:
            problems.append(f"fingerprint {fp!r}")
        if not isinstance(hist, list) or not all(isinstance(r, dict) for r in hist) or (
                isinstance(done, int) and len(hist) != done):
            problems.append("history")
        if problems:
            raise DamagedIndex(f"{where} is damaged ({', '.join(problems)})")
        assert isinstance(done, int) and isinstance(hist, list)  # checked above; says so to the type checker
        run_id = raw.get("run_id", "")
        return cls(done, str(name), str(fp), hist, run_id if isinstance(run_id, str) else "")


@dataclass
class Restored:
    """A committed round read back: its model, the round, the history up to it, the run it belongs to."""

    state: StateDict
    completed: int
    history: list[dict]
    run_id: str


class Checkpointer:
    """Writes and reads ``checkpoints/`` under a run's output folder."""

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def index(self) -> Index | None:
        """``state.json``, checked; None when there is none; :class:`DamagedIndex` when it is damaged."""
        for f in remove_stale_temporaries(self.folder):
            log.info("removed %s, left by a writer that was stopped", f.name)
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            raw = read_json(path)
        except (ValueError, RecursionError) as exc:
            raise DamagedIndex(f"{path} is damaged ({str(exc).split(': ', 1)[-1][:80]})") from None
        return Index.parse(raw, path)

    def load(self) -> dict | None:
        """The index as a plain dict (for status reports); None when there is none or it is damaged."""
        try:
            idx = self.index()
        except DamagedIndex:
            return None
        return None if idx is None else {"completed_rounds": idx.completed, "model_file": idx.model_file,
                                         "fingerprint": idx.fingerprint}

    def _files(self, fingerprint: str, run_id: str | None = None) -> list[tuple[int, Path, dict]]:
        """This fingerprint's round files (of one run when ``run_id`` is given), newest round first."""
        found = []
        for f in sorted(self.folder.glob(PATTERN)):
            meta = read_state_meta(f)
            rnd = meta.get("round")
            if meta.get("fingerprint") != fingerprint or not isinstance(rnd, int) or rnd < 1:
                continue
            if run_id is not None and meta.get("run_id", "") != run_id:
                continue
            found.append((rnd, f, meta))
        return sorted(found, key=lambda t: (-t[0], t[1].name))

    def restore(self, fingerprint: str, index: Index | None) -> Restored | None:
        """The newest good checkpoint of this fingerprint (at or before the index's round when it is valid).

        A file that does not load (damaged, checksum wrong) is skipped with a warning: the run resumes
        after an earlier round instead, with the history cut to match.
        """
        limit = index.completed if index is not None else None
        problems: list[str] = []
        for rnd, path, _ in self._files(fingerprint):
            if limit is not None and rnd > limit:
                continue
            try:
                state, meta = load_state(path, checked=True)
            except ModelFileError as exc:
                problems.append(str(exc))
                continue
            history = meta.get("history")
            if not isinstance(history, list) or len(history) != rnd:
                if index is None:  # a first-format file: its history lives only in the index
                    problems.append(f"{path.name} holds no history")
                    continue
                history = index.history[:rnd]
            if problems or (limit is not None and rnd < limit):
                log.warning("checkpoint %s; resuming after round %d instead",
                            "; ".join(problems) if problems else f"of round {limit} is missing", rnd)
            run_id = meta.get("run_id") if isinstance(meta.get("run_id"), str) else ""
            return Restored(state, rnd, list(history), str(run_id))
        if problems:
            raise ResumeError(f"no readable checkpoint in {self.folder} ({'; '.join(problems)}); "
                              "rerun with --resume never to start over")
        return None

    def save(self, state: StateDict, completed: int, fingerprint: str, history: list[dict], run_id: str) -> None:
        """Commit round ``completed``: its model file (whole on its own), then the index naming it, then
        prune this run's files older than the newest ``keep``."""
        name = f"round_{completed:05d}.safetensors"
        save_state(self.folder / name, state, {"kind": "global", "round": completed, "fingerprint": fingerprint,
                                               "run_id": run_id, "history": history}, owned=True)
        # the folder is this run's (made and locked by it): a damaged index of its own is replaced
        write_json(self.folder / STATE_FILE,
                   {"format": ENGINE_FORMAT, "completed_rounds": completed, "model_file": name,
                    "fingerprint": fingerprint, "run_id": run_id, "history": history}, owned=True)
        mine = self._files(fingerprint, run_id)
        for rnd, path, _ in mine[self.keep:]:
            if path.name != name and rnd < completed:
                path.unlink(missing_ok=True)

    def others(self, fingerprint: str, run_id: str) -> list[str]:
        """Round files here that belong to another run (kept: they are not this run's to remove)."""
        mine = {p.name for _, p, _ in self._files(fingerprint, run_id)}
        return [f.name for f in sorted(self.folder.glob(PATTERN)) if f.name not in mine]
