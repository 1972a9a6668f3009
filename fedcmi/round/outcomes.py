"""A round's client outcomes, trained here one by one or ahead in worker processes: the same updates,
bitwise, in the order asked for."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

from fedcmi.federation import Federation
from fedcmi.round.update import Producer, StateDict
from fedcmi.workers import ClientWorkers


def client_outcomes(fed: Federation, state: StateDict, clients: list[int], round_no: int,
                    workers: ClientWorkers | None = None) -> Iterator[tuple[int, Producer]]:
    """(client id, producer) for ``clients`` in that order: trained here when ``workers`` is None, else
    trained ahead by the worker processes."""
    if workers is not None:
        return workers.outcomes(state, clients, round_no)
    return ((cid, partial(fed.train_client, state, cid, round_no)) for cid in clients)
