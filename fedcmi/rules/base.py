"""The aggregation rule interface, applied per modality group.

Under modality-aware aggregation (FedCMI's) a parameter owned by modality m is combined over the round's
clients that hold m, and left as it was when none does; shared parameters (the fusion head) are combined
over every client. Under plain aggregation every parameter is shared. A rule sees each admitted update
once, in client order, through :meth:`Rule.add`, and gives the next global model with :meth:`Rule.result`;
it works in float64 on the CPU, so the result is bitwise the same in one process or across pods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import ClassVar

import torch
from pydantic import BaseModel

from fedcmi.round.update import ClientUpdate, StateDict

#: A parameter's modality (None: shared by every client).
Owner = Callable[[str], "str | None"]


class Rule(ABC):
    """How a round's admitted updates are combined into the next global model."""

    #: ``server.rule`` of this rule.
    name: ClassVar[str] = ""
    #: Its settings (a pydantic model) at ``server.<name>``; None when it has none.
    Options: ClassVar[type[BaseModel] | None] = None
    #: Whether its memory grows with the round's clients (it holds every update until :meth:`result`).
    holds_updates: ClassVar[bool] = False

    def __init__(self, global_state: Mapping[str, torch.Tensor], owner: Owner | None = None,
                 options: BaseModel | None = None) -> None:
        self.global_state = global_state
        self.owner = owner
        self.options = options
        self.count = 0

    def group(self, key: str) -> str | None:
        """The modality group of parameter ``key`` (None: shared)."""
        return self.owner(key) if self.owner else None

    def said(self, update: ClientUpdate) -> Iterator[tuple[str, torch.Tensor]]:
        """The update's floating tensors it has a say in (shared ones, and those of modalities it holds),
        as sent."""
        held = set(update.modalities)
        for key, value in update.state.items():
            if not value.is_floating_point():
                continue
            group = self.group(key)
            if group is not None and group not in held:
                continue
            yield key, value.detach()

    def contributions(self, update: ClientUpdate) -> Iterator[tuple[str, torch.Tensor]]:
        """:meth:`said`, on the CPU in float64."""
        for key, value in self.said(update):
            yield key, value.to("cpu", torch.float64)

    @abstractmethod
    def add(self, update: ClientUpdate) -> None:
        """Take one admitted update into the round."""

    @abstractmethod
    def result(self) -> StateDict:
        """The combined state: every key of the global model, in its dtype; a key no update had a say in
        keeps its global value."""

    def summary(self) -> dict[str, float]:
        """Figures the rule reports for the round (none by default)."""
        return {}

    def keep(self, key: str) -> torch.Tensor:
        """``key``'s global value, copied: what a parameter nobody had a say in stays at."""
        return self.global_state[key].detach().cpu().clone()

    def aggregate(self, updates: Sequence[ClientUpdate]) -> StateDict:
        """:meth:`add` each update in the order given, then :meth:`result`."""
        for u in updates:
            self.add(u)
        return self.result()


class CoordinateWise(Rule):
    """A rule over the sorted values of each coordinate (unweighted: a client's sample count cannot buy it
    more say, which is the point when counts may lie). Holds every update's floating tensors until
    :meth:`result`."""

    holds_updates = True

    def __init__(self, global_state: Mapping[str, torch.Tensor], owner: Owner | None = None,
                 options: BaseModel | None = None) -> None:
        super().__init__(global_state, owner, options)
        self.values: dict[str, list[torch.Tensor]] = {}

    def add(self, update: ClientUpdate) -> None:
        for key, value in self.contributions(update):
            self.values.setdefault(key, []).append(value)
        self.count += 1

    @abstractmethod
    def middle(self, ordered: torch.Tensor) -> torch.Tensor:
        """The values kept of each coordinate, from the values sorted along dimension 0."""

    def result(self) -> StateDict:
        out: StateDict = {}
        for key, g in self.global_state.items():
            vals = self.values.get(key)
            if not vals:
                out[key] = self.keep(key)
                continue
            out[key] = self.middle(torch.stack(vals).sort(dim=0).values).mean(dim=0).to(g.dtype)
        return out
