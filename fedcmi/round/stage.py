"""The server side of a round as an ordered pipeline of small stages.

Every admitted update passes each stage's :meth:`Stage.admit` in order (a check, or a transform such as
clipping; raising :class:`~fedcmi.round.update.UpdateRejected` refuses it), then each stage's
:meth:`Stage.accept` (folding it in). Once the round's updates are in, each stage's :meth:`Stage.conclude`
turns the :class:`ServerState` into the next one, in order. The order is fixed by
:func:`fedcmi.round.server.stages_for` and checked when the settings are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from fedcmi.round.update import ClientUpdate, StateDict


@dataclass
class ServerState:
    """What the server holds while a round concludes."""

    #: the round's global model (what the clients started from)
    previous: StateDict
    #: the model the round gives, as far as the stages before have made it
    weights: StateDict
    #: the server's own state beside the model (optimiser moments, client states), under ``aux/`` keys
    aux: StateDict
    #: figures the stages report for the round (the record's ``server`` section)
    figures: dict[str, float] = field(default_factory=dict)


class Stage:
    """One step of the server pipeline; every hook does nothing unless overridden."""

    name: ClassVar[str] = ""

    def admit(self, cid: int, update: ClientUpdate) -> ClientUpdate:
        """``update``, sent for client ``cid``, as the next stage sees it; raise UpdateRejected to refuse it."""
        return update

    def accept(self, update: ClientUpdate) -> None:
        """Fold in an update every stage admitted."""

    def conclude(self, state: ServerState) -> ServerState:
        """The server state after this stage, once every update is in."""
        return state
