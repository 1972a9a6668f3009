"""The privacy spent, from the ``dp-accounting`` library's RDP accountant: per modality group and for the
worst-placed client.

Each round is a sampled Gaussian mechanism per group: the group's clipped changes summed, noise of
``noise_multiplier x bound``. A group is accounted at the highest rate any of its holders is drawn (the
sampler's :meth:`~fedcmi.samplers.base.Sampler.inclusion`; a modality-aware sampler draws a rare
modality's holders more often). A client's data reaches every group it has a say in, through one draw, so a
client touching ``g`` groups is accounted as one sampled Gaussian mechanism with noise multiplier
``noise_multiplier / sqrt(g)`` at its own rate; the reported ``epsilon`` is the worst over the kinds of
client. Rounds draw a fixed number of clients without replacement, accounted as Poisson sampling at the same
rate (as TensorFlow Privacy and Opacus do for fixed-size batches): an approximation, stated.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fedcmi.config import Config, ConfigError

if TYPE_CHECKING:
    from fedcmi.models.networks import MultimodalNet
    from fedcmi.partition import Partition

SHARED = "shared"  # the group of parameters every client has a say in (the fusion head)
ALL = "all"  # the one group when privacy is not per modality


class PrivacyBudgetExceeded(ConfigError):
    """A run whose rounds would spend more epsilon than ``privacy.budget_epsilon``."""


def group_of(cfg: Config, owner: str | None) -> str:
    """The privacy group of a parameter owned by ``owner`` (None: shared)."""
    if not per_group(cfg):
        return ALL
    return owner if owner is not None else SHARED


def per_group(cfg: Config) -> bool:
    return cfg.privacy.per_group and cfg.aggregation == "modality_aware"


@functools.lru_cache(maxsize=4096)
def _epsilon(rate: float, sigma: float, rounds: int, delta: float) -> float:
    import logging

    from dp_accounting import dp_event, rdp

    # at a small noise multiplier some RDP orders do not converge; the library drops them (still a valid
    # bound) and says so at WARNING once per order, which would bury a run's log
    logging.getLogger("absl").setLevel(logging.ERROR)

    if rounds == 0 or rate == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), rounds)
    return float(acc.get_epsilon(delta))


@dataclass(frozen=True)
class Accountant:
    """What a federation's rounds cost in privacy, from its settings and who holds what."""

    groups: tuple[str, ...]
    #: per group, the highest rate at which a holder is drawn in a round
    rates: dict[str, float]
    #: per kind of client (the groups it has a say in), the highest rate at which one is drawn
    kinds: dict[tuple[str, ...], float]
    noise_multiplier: float
    delta: float

    def group_epsilon(self, group: str, rounds: int) -> float:
        return _epsilon(self.rates[group], self.noise_multiplier, rounds, self.delta)

    def client_epsilon(self, rounds: int) -> float:
        """The worst client's epsilon after ``rounds`` rounds."""
        return max((_epsilon(rate, self.noise_multiplier / math.sqrt(len(kind)), rounds, self.delta)
                    for kind, rate in self.kinds.items()), default=0.0)

    def figures(self, rounds: int) -> dict[str, float]:
        """``privacy_epsilon`` (worst client) and ``privacy_epsilon_<group>`` after ``rounds`` rounds."""
        out = {"privacy_epsilon": self.client_epsilon(rounds)}
        if self.groups != (ALL,):
            out.update({f"privacy_epsilon_{g}": self.group_epsilon(g, rounds) for g in self.groups})
        return out


def model_groups(cfg: Config, model: MultimodalNet) -> tuple[str, ...]:
    """The privacy groups ``model``'s floating parameters fall in (by each one's owner), in the modalities'
    order and the shared group last (UME's ensemble has no shared one)."""
    present = {group_of(cfg, model.owner(k)) for k, v in model.state_dict().items() if v.is_floating_point()}
    return tuple(g for g in (*cfg.data.modalities, SHARED, ALL) if g in present)


def _kinds(cfg: Config, holdings: Sequence[tuple[str, ...]], inclusion: Sequence[float],
           groups: tuple[str, ...]) -> tuple[dict[str, float], dict[tuple[str, ...], float]]:
    from fedcmi.registry import ALGORITHMS

    strategy = ALGORITHMS.get(cfg.algorithm.name)(cfg)
    rates = dict.fromkeys(groups, 0.0)
    kinds: dict[tuple[str, ...], float] = {}
    for held, p in zip(holdings, inclusion, strict=True):
        if not strategy.participates(held):
            continue
        touched = tuple(g for g in groups if g in (SHARED, ALL) or g in held)
        kinds[touched] = max(kinds.get(touched, 0.0), p)
        for g in touched:
            rates[g] = max(rates[g], p)
    return rates, kinds


def calibrate(cfg: Config, kinds: dict[tuple[str, ...], float]) -> float:
    """The smallest noise multiplier whose worst client ends the run at ``privacy.target_epsilon``."""
    target, rounds, delta = cfg.privacy.target_epsilon, cfg.federation.rounds, cfg.privacy.delta
    assert target is not None

    def worst(sigma: float) -> float:
        return max(_epsilon(rate, sigma / math.sqrt(len(kind)), rounds, delta) for kind, rate in kinds.items())

    low, high = 1e-3, 1.0
    while worst(high) > target:
        high *= 2
        if high > 1e4:
            raise ConfigError(f"privacy.target_epsilon {target:g} cannot be met within a noise multiplier of 1e4")
    while high - low > 1e-6 * high:  # bisection: the accountant is monotone in the noise
        mid = (low + high) / 2
        low, high = (mid, high) if worst(mid) > target else (low, mid)
    return high


@functools.lru_cache(maxsize=16)
def _cached(key: str, holdings: tuple[tuple[str, ...], ...], groups: tuple[str, ...]) -> Accountant:
    from fedcmi.config import config_from_dict
    from fedcmi.registry import SAMPLERS

    cfg = config_from_dict(json.loads(key))
    sampler = SAMPLERS.get(cfg.federation.sampler)(cfg)
    inclusion = sampler.inclusion(len(holdings), cfg.sampled_per_round, holdings)  # over-selected: drawn, kept or not
    rates, kinds = _kinds(cfg, holdings, inclusion, groups)
    sigma = cfg.privacy.noise_multiplier if cfg.privacy.noise_multiplier is not None else calibrate(cfg, kinds)
    acc = Accountant(groups, rates, kinds, sigma, cfg.privacy.delta)
    budget = cfg.privacy.budget_epsilon
    if budget is not None:
        spent = acc.client_epsilon(cfg.federation.rounds)
        if spent > budget:
            fits, over = 0, cfg.federation.rounds  # bisection: epsilon grows with the rounds
            while over - fits > 1:
                mid = (fits + over) // 2
                fits, over = (mid, over) if acc.client_epsilon(mid) <= budget else (fits, mid)
            raise PrivacyBudgetExceeded(
                f"privacy.budget_epsilon {budget:g} is exceeded: federation.rounds {cfg.federation.rounds} spend "
                f"epsilon {spent:.3g} (delta {cfg.privacy.delta:g}, noise multiplier {sigma:.3g}); the budget "
                f"affords {fits} rounds. Lower federation.rounds or raise privacy.noise_multiplier")
    return acc


def accountant(cfg: Config, holdings: Sequence[Sequence[str]], groups: Sequence[str] | None = None) -> Accountant:
    """The federation's accountant (checks ``privacy.budget_epsilon``); cached per settings, holdings and the
    model's groups (:func:`model_groups`; None: every modality's and a shared one, which never understates)."""
    key = json.dumps(cfg.to_dict(), sort_keys=True)
    if groups is None:
        groups = (*cfg.data.modalities, SHARED) if per_group(cfg) else (ALL,)
    return _cached(key, tuple(tuple(h) for h in holdings), tuple(groups))


def trained_rounds(cfg: Config, partition: Partition, trains: Callable[[Sequence[str]], bool], upto: int
                   ) -> list[int]:
    """How many of rounds 1..``upto`` each client trained in: sampled, with something to train, and not late
    (a client whose update was then refused still trained on its data)."""
    from fedcmi.round.deadline import cutoff
    from fedcmi.round.schedule import Schedule

    schedule = Schedule(cfg)
    counts = [0] * len(partition.clients)
    for r in range(1, upto + 1):
        sampled = schedule.clients(r)
        late = cutoff(cfg, partition, r, sampled, trains).late
        for c in sampled:
            if c not in late and trains(partition.client(c).modalities):
                counts[c] += 1
    return counts


def sample_level_epsilon(cfg: Config, num_examples: int, rounds: int) -> float:
    """DP-SGD's epsilon for a client of ``num_examples`` examples after training in ``rounds`` rounds: its
    Poisson-sampled Gaussian steps (``local_epochs`` epochs of ``1 / rate`` steps a round) composed."""
    from fedcmi.privacy.dp_sgd import sampling

    dp = cfg.privacy.dp_sgd
    rate, steps = sampling(cfg, num_examples)
    return _epsilon(rate, dp.noise_multiplier, steps * cfg.federation.local_epochs * rounds, dp.delta)


def sample_level_figures(cfg: Config, partition: Partition, trains: Callable[[Sequence[str]], bool],
                         round_no: int) -> dict[str, float]:
    """``dp_sgd_epsilon`` (the worst client's, after round ``round_no``) and ``dp_sgd_epsilon_<m>`` (the worst
    among the holders of modality m)."""
    counts = trained_rounds(cfg, partition, trains, round_no)
    spent = [sample_level_epsilon(cfg, c.num_examples, n) for c, n in zip(partition.clients, counts, strict=True)]
    out = {"dp_sgd_epsilon": max(spent, default=0.0)}
    for m in cfg.data.modalities:
        out[f"dp_sgd_epsilon_{m}"] = max((e for c, e in zip(partition.clients, spent, strict=True)
                                          if m in c.modalities), default=0.0)
    return out
