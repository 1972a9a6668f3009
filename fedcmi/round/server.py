"""A round's server side: outcomes in, the next federation state out, through the stage pipeline.

:func:`stages_for` builds the pipeline the settings ask for, always in this order::

    admission -> clipping -> client state (control variates) -> aggregation rule -> server optimiser
    admission -> privacy (clip, sum, noise: DP-FedAvg) -> server optimiser         (privacy.mechanism)

and, under DP-SGD in local training (``privacy.dp_sgd``), a last stage that reports its epsilon;

so admission sees every update before anything changes it, and the server optimiser steps from what the
rule gives. :class:`ServerPipeline` feeds it the round's outcomes in the order given (callers sort by
client id) and applies the round's rules: a raised error or a refused update is a rejected outcome and
the round goes on; a round needs ``federation.min_clients`` admitted updates, else :class:`RoundFailed`
(or :class:`RoundDiverged` when every rejection was NaN/Inf or past the bound) and the global model stays;
a round where no sampled client has anything to train is idle and the global model stays.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from fedcmi.algorithms.base import Strategy
from fedcmi.config import Config
from fedcmi.divergence import Diverged, lr_advice
from fedcmi.errors import FedcmiError
from fedcmi.models.networks import MultimodalNet
from fedcmi.partition import Partition
from fedcmi.privacy.stage import CentralPrivacy, SampleLevelAccounting
from fedcmi.registry import RULES
from fedcmi.round.admission import Admission
from fedcmi.round.aggregate import Aggregate
from fedcmi.round.client_state import ControlVariates
from fedcmi.round.clipping import Clipping
from fedcmi.round.record import Participation
from fedcmi.round.server_optimizer import ServerOptimizer
from fedcmi.round.stage import ServerState, Stage
from fedcmi.round.update import (
    ClientUpdate,
    NonFiniteUpdate,
    Producer,
    RunawayUpdate,
    StateDict,
    UpdateLate,
    UpdateRejected,
    failure_reason,
    split_state,
)

log = logging.getLogger("fedcmi")


class RoundFailed(FedcmiError, RuntimeError):
    """Too few valid client updates: the global model stays as it was."""


class RoundDiverged(RoundFailed, Diverged):
    """A failed round whose every client update held NaN or Inf: local training diverged."""


@dataclass
class ServerResult:
    """What the server made of a round."""

    state: StateDict
    participation: Participation
    #: the admitted clients' mean figures, by name
    train: dict[str, float] = field(default_factory=dict)
    algorithm: dict[str, float] = field(default_factory=dict)
    server: dict[str, float] = field(default_factory=dict)


def stages_for(cfg: Config, strategy: Strategy, model: MultimodalNet, partition: Partition, round_no: int,
               sampled: Sequence[int], weights: StateDict, aux: StateDict) -> tuple[Admission, list[Stage]]:
    """Admission and the stages after it, in the pipeline's order, for one round."""
    admission = Admission(round_no, sampled, partition, strategy.participates, strategy.name,
                          cfg.server.max_change_ratio, weights)
    stages: list[Stage] = []
    if cfg.privacy.mechanism == "central":  # clip, sum and noise: it is the aggregation (checked at load)
        from fedcmi.privacy.accounting import accountant, model_groups

        spent = accountant(cfg, [c.modalities for c in partition.clients], model_groups(cfg, model))
        stages.append(CentralPrivacy(cfg, weights, model.owner, aux, spent, round_no))
        if cfg.server_optimizer != "none":
            stages.append(ServerOptimizer(cfg.server, cfg.server_optimizer))
        return admission, _accounted(cfg, partition, strategy, round_no, stages)
    if cfg.server.clip_norm is not None:
        stages.append(Clipping(weights, cfg.server.clip_norm))
    if cfg.control_variates:
        o = cfg.optim  # the round's client learning rate, as the clients' own schedule has it
        lr = o.lr * o.lr_decay ** ((round_no - 1) // o.lr_decay_every)
        stages.append(ControlVariates({n: p.shape for n, p in model.named_parameters()}, len(partition.clients),
                                      aux, lr))
    owner = model.owner if cfg.aggregation == "modality_aware" else None
    rule = RULES.get(cfg.server.rule)
    stages.append(Aggregate(rule(weights, owner, cfg.server.rule_options(rule))))
    if cfg.server_optimizer != "none":
        stages.append(ServerOptimizer(cfg.server, cfg.server_optimizer))
    return admission, _accounted(cfg, partition, strategy, round_no, stages)


def _accounted(cfg: Config, partition: Partition, strategy: Strategy, round_no: int, stages: list[Stage]
               ) -> list[Stage]:
    """``stages`` and, under DP-SGD, the stage that reports its spending (it changes nothing)."""
    if cfg.privacy.dp_sgd.enabled:
        stages.append(SampleLevelAccounting(cfg, partition, strategy.participates, round_no))
    return stages


class ServerPipeline:
    """The server side of rounds of one federation."""

    def __init__(self, cfg: Config, strategy: Strategy, model: MultimodalNet, partition: Partition) -> None:
        self.cfg = cfg
        self.strategy = strategy
        self.model = model
        self.partition = partition

    def conclude(self, global_state: StateDict, outcomes: Iterable[tuple[int, Producer]], round_no: int,
                 sampled: Sequence[int]) -> ServerResult:
        """Fold (client id, producer) pairs, in the order given, into the next federation state."""
        weights, aux = split_state(global_state)
        admission, stages = stages_for(self.cfg, self.strategy, self.model, self.partition, round_no, sampled,
                                       weights, aux)
        part = Participation(sampled=list(sampled))
        non_finite: set[int] = set()
        runaway: set[int] = set()
        kept: list[ClientUpdate] = []
        for cid, produce in outcomes:
            try:
                u = produce()
                if u is None:
                    admission.idle(cid)
                    part.idle.append(cid)
                    continue
                u = admission.admit(cid, u)
                for stage in stages:
                    u = stage.admit(cid, u)
            except UpdateLate as exc:  # missed the round: counted apart, no fault of its update
                part.late[cid] = str(exc)
                continue
            except UpdateRejected as exc:
                part.rejected[cid] = str(exc)
                if isinstance(exc, NonFiniteUpdate):
                    non_finite.add(cid)
                elif isinstance(exc, RunawayUpdate):
                    runaway.add(cid)
            except Exception as exc:  # a client's fault must not end the federation
                part.rejected[cid] = failure_reason(cid, exc)
            else:
                for stage in stages:
                    stage.accept(u)
                part.accepted.append(cid)
                kept.append(ClientUpdate(u.client_id, {}, u.num_examples, u.modalities, u.metrics))
                continue
            log.warning("round %d: update rejected: %s", round_no, part.rejected[cid])
        if not part.accepted and not part.rejected and not part.late:
            log.warning("round %d: no sampled client has anything to train (%s); the global model stays",
                        round_no, part.idle)
            return ServerResult({k: v.detach().cpu().clone() for k, v in global_state.items()},
                                Participation(sampled=list(sampled), idle=part.idle))
        need = self.cfg.federation.min_clients
        if len(part.accepted) < need:
            if part.rejected and non_finite | runaway == set(part.rejected):
                what = "NaN or Inf" if not runaway else "NaN, Inf or a change past the server's bound"
                first = min(part.rejected)  # the rejections say whether the clients or the setting is at fault
                raise RoundDiverged(f"diverged: round {round_no}: every client's update holds {what} "
                                    f"(client {first}: {part.rejected[first][:200]})" + lr_advice(self.cfg.optim.lr))
            raise RoundFailed(
                f"round {round_no}: {len(part.accepted)} valid update(s), federation.min_clients is {need}; "
                f"rejected: {part.rejected or 'none'}" + (f"; late: {sorted(part.late)}" if part.late else "")
            )
        state = ServerState(previous=weights, weights=weights, aux=aux)
        for stage in stages:
            state = stage.conclude(state)
        for stage in stages:
            if isinstance(stage, (Clipping, CentralPrivacy)):
                part.clipped = len(stage.clipped)
        return ServerResult({**state.weights, **state.aux}, part, self.strategy.train_summary(kept),
                            self.strategy.algorithm_summary(kept), state.figures)
