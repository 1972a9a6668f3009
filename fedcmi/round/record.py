"""A round's record, typed: who took part, what the clients reported, the evaluation, the time it took.

Rounds are numbered from 1 everywhere (records, files, logs, the command line); only the seeds count the
rounds done before (``round - 1``). Consumers read the sections (:class:`Participation`, the clients'
``train`` figures, the algorithm's own figures, the :class:`~fedcmi.metrics.Evaluation`, :class:`Timing`),
never key prefixes. :meth:`RoundRecord.to_json` is the flat line ``history.json`` and the checkpoints keep
(one key per figure, as DVC plots read them); :meth:`RoundRecord.from_json` reads it back exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcmi.metrics import Evaluation

TRAIN = "train_"  # the flat prefix of the clients' mean figures in history.json
SERVER = "server_"  # and of the server stages' figures


@dataclass
class Participation:
    """Which clients a round sampled and what became of each."""

    sampled: list[int]
    accepted: list[int] = field(default_factory=list)
    rejected: dict[int, str] = field(default_factory=dict)
    #: sampled, but with nothing to train under this algorithm
    idle: list[int] = field(default_factory=list)
    #: admitted updates whose change was scaled down (``server.clip_norm``); None when clipping is off
    clipped: int | None = None
    #: sampled, and missed the round (past the deadline, after it was full, or unavailable): the reason
    late: dict[int, str] = field(default_factory=dict)


@dataclass
class Timing:
    """What a round cost, and what its model depends on besides the settings."""

    seconds: float
    #: torch threads per process: part of the result (another count gives another model)
    threads: int
    #: processes that trained the round's clients: not part of the result, recorded for the time it explains
    workers: int | None = None
    #: when the round closed on the latency model's clock (simulated seconds); None without a latency model
    simulated: float | None = None


@dataclass
class RoundRecord:
    """One committed (or diverged) round."""

    round: int
    participation: Participation
    timing: Timing
    #: the clients' mean figures (loss and each loss term), by name
    train: dict[str, float] = field(default_factory=dict)
    #: the algorithm's own figures (FedCMI's dominance decisions and class temperatures), by name
    algorithm: dict[str, float] = field(default_factory=dict)
    #: the server stages' figures (a robust rule's), by name
    server: dict[str, float] = field(default_factory=dict)
    evaluation: Evaluation | None = None
    diverged: bool = False

    def to_json(self) -> dict[str, Any]:
        """The flat line of ``history.json``."""
        p = self.participation
        out: dict[str, Any] = {"round": self.round, "clients": list(p.sampled), "accepted": list(p.accepted),
                               "rejected": {str(k): v for k, v in p.rejected.items()}}
        if p.idle:
            out["idle"] = list(p.idle)
        if p.clipped is not None:
            out["clipped"] = p.clipped
        if p.late:
            out["late"] = {str(k): v for k, v in p.late.items()}
        out.update({TRAIN + k: v for k, v in self.train.items()})
        out.update({SERVER + k: v for k, v in self.server.items()})
        out.update(self.algorithm)
        if self.evaluation is not None:
            out.update(self.evaluation.flat())
        out["seconds"] = round(self.timing.seconds, 4)
        out["threads"] = self.timing.threads
        if self.timing.workers is not None:
            out["workers"] = self.timing.workers
        if self.timing.simulated is not None:
            out["simulated_seconds"] = round(self.timing.simulated, 6)
        if self.diverged:
            out["diverged"] = 1
        return out

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> RoundRecord:
        """A record from its flat line (as :meth:`to_json` writes it)."""
        ev = Evaluation.from_flat(raw)
        known = {"round", "clients", "accepted", "rejected", "idle", "clipped", "late", "seconds", "threads",
                 "workers", "simulated_seconds", "diverged"} | (ev.known() if ev is not None else set())
        train = {k[len(TRAIN):]: float(v) for k, v in raw.items() if k.startswith(TRAIN) and _number(v)}
        server = {k[len(SERVER):]: float(v) for k, v in raw.items() if k.startswith(SERVER) and _number(v)}
        algorithm = {k: float(v) for k, v in raw.items()
                     if k not in known and not k.startswith((TRAIN, SERVER)) and _number(v)}
        clipped = raw.get("clipped")
        return cls(
            round=int(raw["round"]),
            participation=Participation(
                sampled=[int(c) for c in raw.get("clients", [])], accepted=[int(c) for c in raw.get("accepted", [])],
                rejected={int(k): str(v) for k, v in dict(raw.get("rejected", {})).items()},
                idle=[int(c) for c in raw.get("idle", [])],
                clipped=int(clipped) if _number(clipped) else None,  # type: ignore[arg-type]
                late={int(k): str(v) for k, v in dict(raw.get("late", {})).items()}),
            timing=Timing(float(raw.get("seconds", 0.0)), int(raw.get("threads", 0)),
                          int(raw["workers"]) if _number(raw.get("workers")) else None,
                          float(raw["simulated_seconds"]) if _number(raw.get("simulated_seconds")) else None),
            train=train, algorithm=algorithm, server=server, evaluation=ev, diverged=bool(raw.get("diverged", 0)))

    def curve_points(self) -> dict[str, float]:
        """What is drawn per round from this record: the evaluation's curve figures and the training loss."""
        out = dict(self.evaluation.curves()) if self.evaluation is not None else {}
        if "loss" in self.train:
            out[TRAIN + "loss"] = self.train["loss"]
        return out


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def curve_rows(history: list[RoundRecord]) -> list[dict[str, float]]:
    """The evaluated rounds with the same figures in every row (what `dvc plots` draws: it drops a file whose
    rows differ): the round and the curve figures every evaluated round has."""
    points = [(r.round, r.curve_points()) for r in history if r.evaluation is not None]
    if not points:
        return []
    common = set.intersection(*(set(p) for _, p in points))
    return [{"round": rnd, **{k: p[k] for k in sorted(common)}} for rnd, p in points]
