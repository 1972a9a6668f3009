"""Krum (Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine
Tolerant Gradient Descent", NeurIPS 2017), per modality group.

In each group (a modality's parameters over the clients holding it; the shared parameters over every
client) each client's vector of that group's parameters is scored by the summed squared distances to its
``n - f - 2`` nearest others, and the client with the lowest score gives the group's value. ``f``
(``byzantine``) is how many lying clients the rule is to withstand; Krum's guarantee needs
``n > 2f + 2``. A group with fewer clients still gets a value (at least one neighbour is scored, ties go to
the lower client id), and the round reports how many groups fell short of the guarantee
(``krum_short_groups``). Unweighted, like the median.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field

from fedcmi.round.update import ClientUpdate, StateDict
from fedcmi.rules.base import Owner, Rule


class KrumOptions(BaseModel):
    """``server.krum``."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    byzantine: int = Field(1, ge=0, le=10_000, strict=True, description="f: the lying clients per group the "
                           "rule is to withstand (its guarantee needs more than 2f + 2 clients in a group)")


class Krum(Rule):
    """The one update per group nearest to its ``n - f - 2`` closest others."""

    name = "krum"
    Options = KrumOptions
    holds_updates = True

    def __init__(self, global_state: Mapping[str, torch.Tensor], owner: Owner | None = None,
                 options: BaseModel | None = None) -> None:
        super().__init__(global_state, owner, options)
        self.updates: list[tuple[int, dict[str, torch.Tensor]]] = []  # (client, its floating tensors)
        self.short = 0

    @property
    def byzantine(self) -> int:
        return int(getattr(self.options, "byzantine", 1))

    def add(self, update: ClientUpdate) -> None:
        self.updates.append((update.client_id, dict(self.contributions(update))))
        self.count += 1

    def selected(self, n: int) -> int:
        """How many of a group's ``n`` best-scored vectors are averaged (Krum: one)."""
        return 1

    def _choose(self, members: list[tuple[int, dict[str, torch.Tensor]]], keys: list[str]) -> list[int]:
        """Indices into ``members`` of the vectors that give the group's value."""
        n = len(members)
        f = self.byzantine
        if n <= 2 * f + 2:
            self.short += 1
        if n == 1:
            return [0]
        dist = torch.zeros(n, n, dtype=torch.float64)
        for key in keys:  # squared distances summed exactly, coordinate by coordinate (no matrix-product shortcut)
            vecs = torch.stack([m[1][key].reshape(-1) for m in members])
            for i in range(n):
                dist[i] += (vecs - vecs[i]).pow(2).sum(dim=1)
        neighbours = min(max(n - f - 2, 1), n - 1)
        scores = [float(torch.cat([dist[i, :i], dist[i, i + 1:]]).sort().values[:neighbours].sum())
                  for i in range(n)]
        order = sorted(range(n), key=lambda i: (scores[i], members[i][0]))  # ties: the lower client id
        return order[:self.selected(n)]

    def result(self) -> StateDict:
        by_group: dict[str | None, list[str]] = {}
        for key, g in self.global_state.items():
            if g.is_floating_point():
                by_group.setdefault(self.group(key), []).append(key)
        out: StateDict = {}
        for _, keys in sorted(by_group.items(), key=lambda t: (t[0] is not None, t[0] or "")):
            members = [(cid, vals) for cid, vals in self.updates if keys[0] in vals]
            if not members:
                continue
            chosen = self._choose(members, keys)
            for key in keys:
                picked = torch.stack([members[i][1][key] for i in chosen])
                out[key] = picked.mean(dim=0).to(self.global_state[key].dtype)
        return {key: out[key] if key in out else self.keep(key) for key in self.global_state}

    def summary(self) -> dict[str, float]:
        return {f"{self.name}_short_groups": float(self.short)}
