"""Checkpoints of a federation: one model file per committed round and ``state.json`` naming the newest.

Shared by every executor (the in-process engine and the pipeline's store), so a run
stopped on one path resumes with the same rules on any.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fedcmi.algorithms.aggregation import StateDict
from fedcmi.io import ModelFileError, load_state, read_json, remove_stale_temporaries, save_state, write_json

log = logging.getLogger("fedcmi")
STATE_FILE = "state.json"
ENGINE_FORMAT = "fedcmi-engine/1"


class ResumeError(RuntimeError):
    """A checkpoint that cannot be resumed under the current settings."""


class Checkpointer:
    """Writes and reads ``checkpoints/`` under a run's output folder.

    ``state.json`` names the newest committed model file and holds the
    history up to it; it is written after that file, so a crash between the
    two leaves the previous round in force. A model file that cannot be read
    (a damaged disk, a hand-edited folder) falls back to the newest older one
    that can, with the history cut to match.
    """

    def __init__(self, folder: Path, keep: int) -> None:
        self.folder = Path(folder)
        self.keep = keep

    def load(self) -> dict | None:
        """The engine state to resume from, or None when there is none."""
        for f in remove_stale_temporaries(self.folder):
            log.info("removed %s, left by a writer that was stopped", f.name)
        path = self.folder / STATE_FILE
        if not path.is_file():
            return None
        try:
            meta = read_json(path)
        except ValueError as exc:
            raise ResumeError(f"{exc}; rerun with --resume never to start over") from None
        if not isinstance(meta, dict) or meta.get("format") != ENGINE_FORMAT:
            raise ResumeError(f"{path} is not a fedcmi engine state; rerun with --resume never to start over")
        return meta

    def load_model(self, meta: dict) -> tuple[StateDict, dict]:
        """The newest readable checkpoint at or before ``meta``'s round, and ``meta`` cut to that round."""
        done = int(meta["completed_rounds"])
        candidates = [meta["model_file"]] + [f.name for f in sorted(self.folder.glob("round_*.safetensors"),
                                                                     reverse=True) if f.name != meta["model_file"]]
        problems = []
        for name in candidates:
            try:
                state, file_meta = load_state(self.folder / name)
            except ModelFileError as exc:
                problems.append(str(exc))
                continue
            rnd = int(file_meta.get("round", -1))
            if file_meta.get("fingerprint") != meta["fingerprint"] or not 0 < rnd <= done:
                problems.append(f"{name} belongs to another run or round")
                continue
            if rnd < done:
                log.warning("checkpoint of round %d is unreadable (%s); resuming after round %d instead",
                            done, problems[0], rnd)
            return state, {**meta, "completed_rounds": rnd, "model_file": name, "history": meta["history"][:rnd]}
        raise ResumeError(f"no readable checkpoint in {self.folder} ({'; '.join(problems)}); "
                          "rerun with --resume never to start over")

    def save(self, state: StateDict, completed: int, fingerprint: str, history: list[dict]) -> None:
        name = f"round_{completed:05d}.safetensors"
        save_state(self.folder / name, state, {"kind": "global", "round": completed, "fingerprint": fingerprint})
        write_json(
            self.folder / STATE_FILE,
            {"format": ENGINE_FORMAT, "completed_rounds": completed, "model_file": name,
             "fingerprint": fingerprint, "history": history},
        )
        files = sorted(self.folder.glob("round_*.safetensors"))
        for old in files[: max(len(files) - self.keep, 0)]:
            if old.name != name:
                old.unlink(missing_ok=True)
