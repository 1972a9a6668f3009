"""A round's client outcomes, trained here one by one or ahead in worker processes: the same updates,
bitwise, in the order asked for."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from fedcmi.federation import Federation
from fedcmi.round.deadline import cutoff
from fedcmi.round.update import Producer, StateDict
from fedcmi.workers import ClientWorkers


def client_outcomes(fed: Federation, state: StateDict, clients: list[int], round_no: int,
                    workers: ClientWorkers | None = None, sampled: list[int] | None = None
                    ) -> Iterator[tuple[int, Producer]]:
    """(client id, producer) for ``clients`` (of round ``round_no``'s sample ``sampled``; all of it when
    None) in that order: trained here when ``workers`` is None, else trained ahead by the worker processes.
    A client the latency model finds late is not trained: its outcome is the late one."""
    cut = cutoff(fed.cfg, fed.partition, round_no, clients if sampled is None else sampled,
                 fed.strategy.participates)
    due = [c for c in clients if c not in cut.late]
    if workers is not None:
        trained = workers.outcomes(state, due, round_no)
    else:
        trained = ((cid, partial(fed.train_client, state, cid, round_no)) for cid in due)
    mine = set(clients)
    return ((cid, p) for cid, p in cut.apply(trained) if cid in mine)
