"""The privacy stage: DP-FedAvg's clip, sum and Gaussian noise, per modality group, with fixed or adaptive
clipping.

Every admitted client's change from the global model is clipped, group by group (each modality's encoder
and the shared fusion head under per-group privacy; the whole model otherwise), to the group's bound; the
clipped changes are summed in float64, Gaussian noise of std ``noise x bound`` is added to each group's
sum from a generator seeded by the run's seed and the round (so the same seed gives the same model in one
process or across pods), and the sum is divided by the group's number of contributors. Every contributor
counts the same. Adaptive clipping moves each group's bound geometrically towards a quantile of the
clients' change norms, learnt from a noised count of the clients under it; the bound lives in the server
state (``aux/privacy/``), so a resumed or pipelined federation continues it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from fedcmi.config import Config
from fedcmi.partition import Partition
from fedcmi.privacy.accounting import ALL, SHARED, Accountant, group_of, sample_level_figures
from fedcmi.privacy.checks import count_noise, model_noise
from fedcmi.round.stage import ServerState, Stage
from fedcmi.round.update import AUX, ClientUpdate, StateDict
from fedcmi.seeds import derive_seed

PRIVACY_STREAM = 0x5052495600  # separates the noise's seed from every other stream of the run
CLIP_KEY = AUX + "privacy/clip/"


class CentralPrivacy(Stage):
    """Clips each admitted change per group, and makes the round's model from the noised mean."""

    name = "privacy"

    def __init__(self, cfg: Config, global_state: Mapping[str, torch.Tensor], owner: Callable[[str], str | None],
                 aux: StateDict, accountant: Accountant, round_no: int) -> None:
        self.cfg = cfg
        self.round_no = round_no
        self.accountant = accountant
        self.base = {k: v.detach().to("cpu", torch.float64) for k, v in global_state.items() if v.is_floating_point()}
        #: the group a key is clipped and noised with, and the group whose contributors its mean divides by
        self.clip_group = {k: group_of(cfg, owner(k)) for k in self.base}
        aware = cfg.aggregation == "modality_aware"
        self.mean_group = {k: (owner(k) or SHARED) if aware else ALL for k in self.base}
        p = cfg.privacy
        self.bounds = {g: float(aux[CLIP_KEY + g]) if CLIP_KEY + g in aux else p.clip_norm
                       for g in accountant.groups}
        sigma = accountant.noise_multiplier
        self.count_sigma = count_noise(cfg, sigma)
        self.noise = model_noise(sigma, self.count_sigma) if p.clipping == "adaptive" else sigma
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self.contributors = dict.fromkeys(accountant.groups, 0)
        self.unclipped = dict.fromkeys(accountant.groups, 0)
        self.clipped: list[int] = []
        self._pending: dict[int, tuple[dict[str, torch.Tensor], set[str], set[str]]] = {}

    def _said(self, update: ClientUpdate) -> list[str]:
        """The keys the update has a say in (shared ones, and its own modalities'), as the mean rule has it."""
        held = set(update.modalities)
        return [k for k, g in self.mean_group.items() if (g in (SHARED, ALL) or g in held) and k in update.state]

    def admit(self, cid: int, update: ClientUpdate) -> ClientUpdate:
        """Clip the update's change, group by group; what it adds is kept for :meth:`accept`."""
        deltas = {k: update.state[k].detach().to("cpu", torch.float64) - self.base[k] for k in self._said(update)}
        by_group: dict[str, list[str]] = {}
        for k in deltas:
            by_group.setdefault(self.clip_group[k], []).append(k)
        under: set[str] = set()
        for group, keys in by_group.items():
            norm = math.sqrt(sum(float(deltas[k].pow(2).sum()) for k in keys))
            if norm <= self.bounds[group]:
                under.add(group)
                continue
            scale = self.bounds[group] / norm
            for k in keys:
                deltas[k].mul_(scale)
        if len(under) < len(by_group):
            self.clipped.append(cid)
        self._pending[cid] = (deltas, set(by_group), under)
        return update

    def accept(self, update: ClientUpdate) -> None:
        deltas, groups, under = self._pending.pop(update.client_id)
        for g in groups:
            self.contributors[g] += 1
            self.unclipped[g] += g in under
        for g in {self.mean_group[k] for k in deltas}:
            self.counts[g] = self.counts.get(g, 0) + 1
        for k, d in deltas.items():
            self.sums[k] = self.sums[k] + d if k in self.sums else d

    def conclude(self, state: ServerState) -> ServerState:
        self._pending.clear()  # updates a later stage refused
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, PRIVACY_STREAM, self.round_no))
        noised: StateDict = {}
        for key in sorted(self.sums):  # sorted: a model read from a file lists its keys in another order
            g = state.weights[key]
            std = self.noise * self.bounds[self.clip_group[key]]
            noise = torch.normal(0.0, std, g.shape, generator=gen, dtype=torch.float64)
            noised[key] = (self.base[key] + (self.sums[key] + noise) / self.counts[self.mean_group[key]]).to(g.dtype)
        # integer buffers, and a group nobody sent, stay as they were
        state.weights = {k: noised[k] if k in noised else g.detach().cpu().clone() for k, g in state.weights.items()}
        figures = self.accountant.figures(self.round_no)
        figures["privacy_noise_multiplier"] = self.accountant.noise_multiplier
        aux = dict(state.aux)
        for group in self.accountant.groups:
            figures[f"privacy_clip_{group}"] = self.bounds[group]
            if self.cfg.privacy.clipping == "adaptive":
                aux[CLIP_KEY + group] = torch.tensor(self._next_bound(group, gen), dtype=torch.float64)
        state.aux = aux
        state.figures.update(figures)
        return state

    def _next_bound(self, group: str, gen: torch.Generator) -> float:
        """The group's bound for the next round: a geometric step towards the target quantile, from the
        noised share of contributors the bound left unclipped (Andrew et al. 2021)."""
        n = self.contributors[group]
        if n == 0:
            return self.bounds[group]
        a = self.cfg.privacy.adaptive
        noisy = self.unclipped[group] + float(torch.normal(0.0, self.count_sigma, (1,), generator=gen,
                                                           dtype=torch.float64))
        return self.bounds[group] * math.exp(-a.learning_rate * (noisy / n - a.target_quantile))


class SampleLevelAccounting(Stage):
    """Reports what DP-SGD inside local training has spent after the round (``privacy.dp_sgd``): the worst
    client's epsilon, and the worst among each modality's holders. It changes no update."""

    name = "dp_sgd_accounting"

    def __init__(self, cfg: Config, partition: Partition, trains: Callable[[Sequence[str]], bool],
                 round_no: int) -> None:
        self.cfg = cfg
        self.partition = partition
        self.trains = trains
        self.round_no = round_no

    def conclude(self, state: ServerState) -> ServerState:
        state.figures.update(sample_level_figures(self.cfg, self.partition, self.trains, self.round_no))
        return state
