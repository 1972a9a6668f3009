"""The aggregation stage: the configured rule (``server.rule``, see :mod:`fedcmi.rules`) over the
admitted updates, per modality group when the algorithm aggregates modality-aware."""

from __future__ import annotations

from fedcmi.round.stage import ServerState, Stage
from fedcmi.round.update import ClientUpdate
from fedcmi.rules.base import Rule


class Aggregate(Stage):
    """Folds every admitted update into the rule, and takes the rule's result as the round's model."""

    name = "aggregate"

    def __init__(self, rule: Rule) -> None:
        self.rule = rule

    def accept(self, update: ClientUpdate) -> None:
        self.rule.add(update)

    def conclude(self, state: ServerState) -> ServerState:
        state.weights = self.rule.result()
        state.figures.update(self.rule.summary())
        return state
