"""Which sampled clients miss a round: a seeded latency model, a deadline and over-selection.

Production federations do not wait for the slowest client (Bonawitz et al., "Towards Federated Learning at
Scale", MLSys 2019): a round samples more clients than it needs, keeps the first ``clients_per_round`` that
report, and closes at a deadline. Here when each client reports comes from
:class:`~fedcmi.config.LatencyConfig`'s model, drawn from the run's seed and the round alone (like the
sample), so the engine and every pod of a pipeline find the same clients late without timing anything; a
late client is not trained at all, and an update that arrives for one anyway is discarded, as a server
discards what comes after the round closed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from fedcmi.config import Config
from fedcmi.partition import Partition
from fedcmi.round.update import Producer, UpdateLate
from fedcmi.seeds import derive_seed

LATENCY_STREAM = 0x1A7E


@lru_cache(maxsize=8)
def _speeds(seed: int, num_clients: int, spread: float) -> np.ndarray:
    """Each client's speed, fixed for the run (log-normal around 1)."""
    rng = np.random.default_rng(derive_seed(seed, LATENCY_STREAM))
    return np.exp(spread * rng.standard_normal(num_clients))


def report_times(cfg: Config, partition: Partition, round_no: int) -> list[float | None]:
    """When each client of the federation would report in round ``round_no`` (simulated seconds from the
    round's start; None: it does not report this round). Every client's figure is drawn, sampled or not,
    so a client's time does not depend on who else was sampled."""
    lat = cfg.federation.latency
    n = len(partition.clients)
    rng = np.random.default_rng(derive_seed(cfg.seed, round_no - 1, LATENCY_STREAM))
    noise = rng.standard_normal(n)
    present = rng.random(n) < lat.availability
    speed = _speeds(cfg.seed, n, lat.speed_spread)
    slow = set(lat.stragglers)
    out: list[float | None] = []
    for c, shard in enumerate(partition.clients):
        work = shard.num_examples * cfg.federation.local_epochs * lat.seconds_per_example
        t = work / speed[c] * float(np.exp(lat.jitter * noise[c])) * (lat.straggler_slowdown if c in slow else 1.0)
        out.append(float(t) if present[c] else None)
    return out


@dataclass(frozen=True)
class Cutoff:
    """A round's verdict on its sampled clients: who is late and why, and when the round closes."""

    round_no: int
    #: late client -> the reason (past the deadline, after the round was full, or not reporting)
    late: dict[int, str] = field(default_factory=dict)
    #: when the round closes (simulated seconds); None without a latency model
    closes: float | None = None

    def missing(self, cid: int) -> Producer:
        reason = self.late[cid]

        def produce() -> None:
            raise UpdateLate(reason)
        return produce

    def apply(self, outcomes: Iterable[tuple[int, Producer]]) -> Iterator[tuple[int, Producer]]:
        """``outcomes`` (in client order) with each late client's outcome in its place: its update, if one
        came at all, is never read. Late clients the stream leaves out are put in at their place."""
        pending = sorted(self.late)
        done: set[int] = set()
        for cid, produce in outcomes:
            while pending and pending[0] < cid:
                c = pending.pop(0)
                done.add(c)
                yield c, self.missing(c)
            if cid in self.late:
                if cid not in done:
                    done.add(cid)
                    if pending and pending[0] == cid:
                        pending.pop(0)
                    yield cid, self.missing(cid)
                continue
            yield cid, produce
        for c in pending:
            yield c, self.missing(c)


def cutoff(cfg: Config, partition: Partition, round_no: int, sampled: Sequence[int],
           trains: Callable[[Sequence[str]], bool]) -> Cutoff:
    """Round ``round_no``'s late clients among ``sampled``. A client with nothing to train under the algorithm
    (``trains`` false for its modalities) reports at once and takes no place; the others report at their
    time, are late past ``federation.deadline``, and once ``clients_per_round`` have reported (by time,
    then client id) the rest are late too."""
    fed = cfg.federation
    if fed.latency.model == "none":
        return Cutoff(round_no)
    times = report_times(cfg, partition, round_no)
    late: dict[int, str] = {}
    missed = False  # a client the round waited for until its deadline
    arrived: list[tuple[float, int]] = []
    for c in sampled:
        if not trains(partition.client(c).modalities):
            continue
        t = times[c]
        if t is None:
            late[c] = f"client {c}: unavailable in round {round_no} (it did not report)"
            missed = missed or fed.deadline is not None
        elif fed.deadline is not None and t > fed.deadline:
            late[c] = f"client {c}: late: reports at {t:.4g} s, after the round's deadline of {fed.deadline:g} s"
            missed = True
        else:
            arrived.append((t, c))
    arrived.sort()
    kept, surplus = arrived[:fed.clients_per_round], arrived[fed.clients_per_round:]
    last = kept[-1][0] if kept else 0.0
    for t, c in surplus:
        late[c] = (f"client {c}: late: reports at {t:.4g} s, after the round had its {fed.clients_per_round} "
                   f"updates (at {last:.4g} s)")
    # full: at its last kept report; else at the deadline when it waited for someone, else at the last report
    closes = fed.deadline if missed and not surplus and fed.deadline is not None else last
    return Cutoff(round_no, dict(sorted(late.items())), closes)
