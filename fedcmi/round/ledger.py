"""The committed rounds of one federation: checkpoints on disk, the history, the divergence guard.

One ledger per federation, whoever runs it: the in-process engine keeps it in ``<out>/checkpoints``, a
pipeline in its store's ``checkpoints``. Its fingerprint covers everything a round's model depends on (the
settings but the round count and reporting, the partition file and the prepared data), so a checkpoint is
resumed only by the federation that made it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from fedcmi.checkpoint import Checkpointer, DamagedIndex, ResumeError, new_run_id
from fedcmi.config import Config
from fedcmi.data import DataModule
from fedcmi.divergence import Diverged, DivergenceGuard, chance_accuracy
from fedcmi.round.record import RoundRecord
from fedcmi.round.sinks import MetricSink
from fedcmi.round.update import StateDict

log = logging.getLogger("fedcmi")

#: The folder of a federation's checkpoints, inside its output folder or store.
CHECKPOINTS = "checkpoints"


class ForeignCheckpoint(ResumeError):
    """A checkpoint made with other settings or data than the run that was told to resume it."""


def checkpoint_folder(out_dir: str | Path) -> Path:
    return Path(out_dir) / CHECKPOINTS


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


class Ledger:
    """The committed rounds of one federation.

    :meth:`open` resumes from the folder's checkpoint when it was made with the same fingerprint;
    :meth:`commit` checks a round's record against the guard, then writes the model and the history
    atomically, so a process killed at any point resumes after its last committed round.
    """

    def __init__(self, folder: Path, keep: int, fingerprint: str, guard: DivergenceGuard) -> None:
        self.ckpt = Checkpointer(folder, keep)
        self.fingerprint = fingerprint
        self.guard = guard
        self.history: list[RoundRecord] = []
        self.completed = 0
        self.run_id = new_run_id()

    @classmethod
    def of(cls, cfg: Config, folder: Path, data: DataModule) -> Ledger:
        """The ledger of the federation ``cfg`` describes, kept in ``folder``: its fingerprint covers the
        settings, the partition file and the prepared data; its guard knows the test split's chance level."""
        guard = DivergenceGuard(chance_accuracy(data.test.labels, data.spec.num_classes), cfg.optim.lr,
                                cfg.evaluation.divergence_patience, cfg.evaluation.divergence_margin)
        return cls(folder, cfg.output.keep_checkpoints, run_fingerprint(cfg, cfg.partition.file, data.meta), guard)

    @property
    def folder(self) -> Path:
        return self.ckpt.folder

    @staticmethod
    def committed_in(folder: Path) -> int:
        """How many rounds the checkpoint in ``folder`` has committed (0 when none, or its index is damaged)."""
        try:
            index = Checkpointer(folder, 1).index()
        except DamagedIndex:
            return 0
        return index.completed if index is not None else 0

    def matches(self) -> bool:
        """Whether the folder's newest checkpoint is this federation's (same fingerprint)."""
        try:
            index = self.ckpt.index()
        except DamagedIndex:
            return False
        return index is not None and index.fingerprint == self.fingerprint

    def open(self, resume: Literal["auto", "never", "must"], rounds: int) -> StateDict | None:
        """The committed global model to continue from, or None to start at round 1; a checkpoint with more
        than ``rounds`` rounds committed cannot be continued.

        A damaged ``state.json`` is replaced by the newest good round file of these settings; a damaged
        round file by the one before it.
        """
        found = None
        if resume != "never":
            try:
                index = self.ckpt.index()
            except DamagedIndex as exc:
                log.warning("%s; looking for the newest good checkpoint of these settings", exc)
                index = None
            if index is not None and index.fingerprint != self.fingerprint:
                if resume == "must":
                    raise ForeignCheckpoint(f"the checkpoint in {self.ckpt.folder} was made with other settings "
                                            "or data; cannot resume it")
                log.warning("checkpoint in %s was made with other settings; starting from round 1",
                            self.ckpt.folder)
            else:
                found = self.ckpt.restore(self.fingerprint, index)
        if found is None:
            if resume == "must":
                raise ResumeError(f"no checkpoint to resume in {self.ckpt.folder}")
            others = self.ckpt.others(self.fingerprint, self.run_id)
            if others:
                log.info("%d checkpoint file(s) of an earlier run stay in %s (never pruned by this run)",
                         len(others), self.ckpt.folder)
            return None
        self.completed, self.run_id = found.completed, found.run_id or self.run_id
        self.history = [RoundRecord.from_json(r) for r in found.history]
        if self.completed > rounds:
            raise ResumeError(f"the checkpoint in {self.ckpt.folder} has {self.completed} rounds done, more than "
                              f"federation.rounds={rounds}")
        for rec in self.history:  # a resumed run remembers how far above chance it has been
            self.guard.check_round(rec)
        log.info("resuming after round %d", self.completed)
        return found.state

    def commit(self, state: StateDict, rec: RoundRecord, sinks: Sequence[MetricSink] = ()) -> None:
        """Commit round ``rec.round``, then hand its record to ``sinks``; a diverged round is reported (marked
        diverged), never committed (resuming starts before it)."""
        if rec.round != self.completed + 1:
            raise RuntimeError(f"round {rec.round} cannot follow round {self.completed}")
        reason = self.guard.check_round(rec)
        if reason is not None:
            rec.diverged = True
            for sink in sinks:
                sink.log_round(rec)
            raise Diverged(reason)
        self.history.append(rec)
        self.ckpt.save(state, self.completed + 1, self.fingerprint, [r.to_json() for r in self.history], self.run_id)
        self.completed += 1
        for sink in sinks:
            sink.log_round(rec)

    def finish(self, final_acc: float) -> None:
        """The guard's last word on the final model: raises :class:`Diverged`, or logs a warning."""
        reason, warning = self.guard.check_final(final_acc)
        if reason is not None:
            raise Diverged(reason)
        if warning is not None:
            log.warning("%s", warning)
