"""What a round is, once, for every executor.

:class:`RoundPolicy` owns the parts of a round that are policy, not compute:
which clients a round samples (and how they split over workers), what a
client's outcome means (an update, nothing to train, or a failure that becomes
a rejected update), how many valid updates a round needs
(``federation.min_clients``), when the global model is evaluated, and the
round's record. :class:`Ledger` owns what a round leaves behind: the committed
checkpoint, the history and the divergence guard.

The in-process engine and the Kubeflow components both run rounds through
these two objects, so a failing client, a failed round or a diverged run ends
the same way on both paths and the same seed gives the same model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from fedcmi.admission import Admission
from fedcmi.algorithms import ClientUpdate, Strategy, UpdateRejected
from fedcmi.algorithms.aggregation import NonFiniteUpdate, RunawayUpdate, StateDict, split_state
from fedcmi.algorithms.base import derive_seed
from fedcmi.algorithms.server_step import ControlVariates, server_step
from fedcmi.checkpoint import Checkpointer, DamagedIndex, ResumeError, new_run_id
from fedcmi.config import Config
from fedcmi.divergence import Diverged, DivergenceGuard, lr_advice
from fedcmi.models.networks import MultimodalNet
from fedcmi.partition import Partition
from fedcmi.update_files import ClientFailed

log = logging.getLogger("fedcmi")

#: A client's part of a round, produced lazily: an update, None (nothing to train), or an exception.
Producer = Callable[[], "ClientUpdate | None"]


class RoundFailed(RuntimeError):
    """Too few valid client updates: the global model stays as it was."""


class RoundDiverged(RoundFailed, Diverged):
    """A failed round whose every client update held NaN or Inf: local training diverged."""


class ForeignCheckpoint(ResumeError):
    """A checkpoint made with other settings or data than the run that was told to resume it."""


def sample_clients(cfg: Config, rnd: int) -> list[int]:
    """The clients of round ``rnd``, drawn from the seed and the round alone, so every executor draws the
    same without the data."""
    rng = np.random.default_rng(derive_seed(cfg.seed, rnd, 0xC11E))
    n = cfg.partition.num_clients
    return sorted(rng.choice(n, size=cfg.federation.clients_per_round, replace=False).tolist())


def failure_reason(cid: int, exc: BaseException) -> str:
    """How a client's training failure reads in a round's ``rejected`` map, wherever it ran."""
    if isinstance(exc, ClientFailed):
        return str(exc)
    return f"client {cid}: training failed: {exc.__class__.__name__}: {exc}"


@dataclass
class RoundResult:
    state: StateDict
    clients: list[int]
    accepted: list[int]
    rejected: dict[int, str] = field(default_factory=dict)
    summary: dict[str, float] = field(default_factory=dict)
    idle: list[int] = field(default_factory=list)  # sampled, but with nothing to train under this algorithm


class RoundPolicy:
    """Client sampling, the failure rule, aggregation order, the evaluation schedule and the round record."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    def rounds(self) -> int:
        return self.cfg.federation.rounds

    def clients(self, rnd: int) -> list[int]:
        return sample_clients(self.cfg, rnd)

    def workers(self, per_worker: int) -> int:
        """How many workers (pods) a round needs when each trains up to ``per_worker`` clients."""
        return -(-self.cfg.federation.clients_per_round // per_worker)

    def clients_of_worker(self, rnd: int, worker: int, per_worker: int) -> list[int]:
        """The clients worker ``worker`` trains in round ``rnd``: consecutive runs of the sorted sample."""
        return self.clients(rnd)[worker * per_worker:(worker + 1) * per_worker]

    def evaluates(self, rnd: int) -> bool:
        """Whether round ``rnd`` (0-based) ends with an evaluation: every ``evaluation.every`` and the last."""
        return (rnd + 1) % self.cfg.evaluation.every == 0 or rnd + 1 == self.rounds

    def probes(self, rnd: int) -> bool:
        """Whether round ``rnd``'s evaluation includes the linear probes (the run's final evaluation)."""
        return rnd + 1 == self.rounds and self.cfg.evaluation.linear_probe

    def conclude(self, strategy: Strategy, model: MultimodalNet, global_state: StateDict,
                 producers: Iterable[tuple[int, Producer]], rnd: int, partition: Partition) -> RoundResult:
        """Fold (client id, producer) pairs in the order given into the next global model.

        A producer may return None (nothing to train) or raise. Every outcome goes through the round's
        :class:`~fedcmi.admission.Admission` (sampled, once, fits the model and the client's shard, within
        the change bound); a raised error or a refused outcome is a rejected update and the round goes on.
        A round needs ``federation.min_clients`` admitted updates, else :class:`RoundFailed` (or
        :class:`RoundDiverged` when every rejection was NaN/Inf) and the global model stays. A round where
        no sampled client has anything to train is idle: the global model stays, and the run goes on.
        """
        weights, aux = split_state(global_state)
        gate = Admission(rnd, frozenset(self.clients(rnd)), partition, strategy, self.cfg.server, weights)
        acc = strategy.accumulator(model, weights)
        controls = (ControlVariates({n: p.shape for n, p in model.named_parameters()}, len(partition.clients), aux)
                    if self.cfg.control_variates else None)
        accepted: list[int] = []
        idle: list[int] = []
        rejected: dict[int, str] = {}
        non_finite: set[int] = set()
        runaway: set[int] = set()
        kept: list[ClientUpdate] = []
        for cid, produce in producers:
            try:
                u = produce()
                if u is None:
                    gate.idle(cid)
                    idle.append(cid)
                    continue
                u = gate.admit(cid, u)
                if controls is not None:
                    controls.check(u)
            except UpdateRejected as exc:
                rejected[cid] = str(exc)
                if isinstance(exc, NonFiniteUpdate):
                    non_finite.add(cid)
                elif isinstance(exc, RunawayUpdate):
                    runaway.add(cid)
            except Exception as exc:  # a client's fault must not end the federation
                rejected[cid] = failure_reason(cid, exc)
            else:
                acc.add(u)
                if controls is not None:
                    controls.add(u)
                accepted.append(cid)
                kept.append(ClientUpdate(u.client_id, {}, u.num_examples, u.modalities, u.metrics))
                continue
            log.warning("round %d: update rejected: %s", rnd + 1, rejected[cid])
        need = self.cfg.federation.min_clients
        if not accepted and not rejected:
            log.warning("round %d: no sampled client has anything to train (%s); the global model stays",
                        rnd + 1, idle)
            return RoundResult({k: v.detach().cpu().clone() for k, v in global_state.items()}, [], [], {}, {},
                               idle)
        if len(accepted) < need:
            if rejected and non_finite | runaway == set(rejected):
                what = "NaN or Inf" if not runaway else "NaN, Inf or a change past the server's bound"
                raise RoundDiverged(f"diverged: round {rnd + 1}: every client's update holds {what}"
                                    + lr_advice(self.cfg.optim.lr))
            raise RoundFailed(
                f"round {rnd + 1}: {len(accepted)} valid update(s), federation.min_clients is {need}; "
                f"rejected: {rejected or 'none'}"
            )
        summary = strategy.round_summary(kept)
        if self.cfg.server.clip_norm is not None:
            summary["clipped"] = float(len(gate.clipped))
        if controls is not None:
            aux = controls.result()
        state, aux = server_step(self.cfg.server, self.cfg.server_optimizer, weights, acc.result(), aux)
        return RoundResult({**state, **aux}, [], accepted, rejected, summary, idle)

    def record(self, rnd: int, res: RoundResult, metrics: dict[str, float] | None, seconds: float,
               workers: int | None = None) -> dict:
        """The round's line in ``history.json`` and in the tracking run; ``workers``: the processes that
        trained its clients."""
        rec: dict = {"round": rnd + 1, "clients": res.clients, "accepted": res.accepted,
                     "rejected": res.rejected, **({"idle": res.idle} if res.idle else {}), **res.summary}
        if metrics is not None:
            rec.update(metrics)
        rec["seconds"] = round(seconds, 4)
        rec["threads"] = torch.get_num_threads()  # part of the result: another count gives another model
        if workers is not None:  # not part of it: recorded for the time it explains
            rec["workers"] = workers
        return rec


class Ledger:
    """The committed rounds of one federation: checkpoints on disk, the history, the divergence guard.

    :meth:`open` resumes from the folder's checkpoint when it was made with the same fingerprint;
    :meth:`commit` checks a round's record against the guard, then writes the model and the history
    atomically, so a process killed at any point resumes after its last committed round.
    """

    def __init__(self, folder: Path, keep: int, fingerprint: str, guard: DivergenceGuard) -> None:
        self.ckpt = Checkpointer(folder, keep)
        self.fingerprint = fingerprint
        self.guard = guard
        self.history: list[dict] = []
        self.completed = 0
        self.run_id = new_run_id()

    def open(self, resume: Literal["auto", "never", "must"], rounds: int) -> StateDict | None:
        """The committed global model to continue from, or None to start at round 0; a checkpoint with more
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
                log.warning("checkpoint in %s was made with other settings; starting from round 0",
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
        self.completed, self.history, self.run_id = found.completed, found.history, found.run_id or self.run_id
        if self.completed > rounds:
            raise ResumeError(f"the checkpoint in {self.ckpt.folder} has {self.completed} rounds done, more than "
                              f"federation.rounds={rounds}")
        for rec in self.history:  # a resumed run remembers how far above chance it has been
            self.guard.check_round(rec)
        log.info("resuming after round %d", self.completed)
        return found.state

    def commit(self, state: StateDict, rec: dict, on_round: Callable[[dict], None] | None = None) -> None:
        """Commit round ``rec['round']``; a diverged round is reported, never committed (resuming starts
        before it)."""
        if int(rec["round"]) != self.completed + 1:
            raise RuntimeError(f"round {rec['round']} cannot follow round {self.completed}")
        reason = self.guard.check_round(rec)
        if reason is not None:
            rec["diverged"] = 1
            if on_round is not None:
                on_round(rec)
            raise Diverged(reason)
        self.history.append(rec)
        self.ckpt.save(state, self.completed + 1, self.fingerprint, self.history, self.run_id)
        self.completed += 1
        if on_round is not None:
            on_round(rec)

    def finish(self, final_acc: float) -> None:
        """The guard's last word on the final model: raises :class:`Diverged`, or logs a warning."""
        reason, warning = self.guard.check_final(final_acc)
        if reason is not None:
            raise Diverged(reason)
        if warning is not None:
            log.warning("%s", warning)
