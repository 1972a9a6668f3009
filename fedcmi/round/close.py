"""The tail of every round, once: fold the outcomes, evaluate when scheduled, record, commit.

:func:`close_round` is what the in-process engine, the pipeline's conclude step and the file-to-file
``fedcmi aggregate`` all call, so a round ends the same way wherever it ran; :func:`final_evaluation` is
the federation's last word once every round is committed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from fedcmi.federation import Federation
from fedcmi.metrics import Evaluation
from fedcmi.round.deadline import cutoff
from fedcmi.round.ledger import Ledger
from fedcmi.round.record import RoundRecord, Timing
from fedcmi.round.schedule import Schedule
from fedcmi.round.server import ServerPipeline
from fedcmi.round.sinks import MetricSink
from fedcmi.round.update import Producer, StateDict


@dataclass
class ClosedRound:
    """A round's outcome: the next federation state and its record."""

    state: StateDict
    record: RoundRecord

    @property
    def evaluation(self) -> Evaluation | None:
        return self.record.evaluation


def close_round(fed: Federation, state: StateDict, sampled: Sequence[int], outcomes: Iterable[tuple[int, Producer]],
                round_no: int, *, ledger: Ledger | None = None, sinks: Sequence[MetricSink] = (),
                evaluate: bool | None = None, workers: int | None = None, started: float | None = None,
                keep_final: Callable[[Evaluation], None] | None = None) -> ClosedRound:
    """Fold round ``round_no``'s outcomes (in the order given; a client the latency model finds late has
    its update, if any, replaced by the late outcome) into the next state, evaluate it when the
    schedule says so (or as ``evaluate`` says), record it, commit it to ``ledger`` (when given) and hand
    the record to ``sinks``. On the federation's last round ``keep_final`` gets the final evaluation before
    the divergence guard has its last word.

    ``started``: when the round began (``time.perf_counter()``), for its record; ``workers``: the processes
    that trained its clients.
    """
    t0 = time.perf_counter() if started is None else started
    schedule = Schedule(fed.cfg)
    cut = cutoff(fed.cfg, fed.partition, round_no, sampled, fed.strategy.participates)
    res = ServerPipeline(fed.cfg, fed.strategy, fed.model, fed.partition).conclude(state, cut.apply(outcomes),
                                                                                  round_no, sampled)
    scheduled = schedule.evaluates(round_no) if evaluate is None else evaluate
    ev = fed.evaluate(res.state, probe=schedule.probes(round_no)) if scheduled else None
    timing = Timing(time.perf_counter() - t0, torch.get_num_threads(), workers, cut.closes)
    rec = RoundRecord(round_no, res.participation, timing,
                      train=res.train, algorithm=res.algorithm, server=res.server, evaluation=ev)
    if ledger is None:
        for sink in sinks:
            sink.log_round(rec)
        return ClosedRound(res.state, rec)
    ledger.commit(res.state, rec, sinks)
    if schedule.is_last(round_no) and ev is not None:
        if keep_final is not None:
            keep_final(ev)
        ledger.finish(ev.mm_acc)  # the last round is committed; the run may still fail
    return ClosedRound(res.state, rec)


def final_evaluation(fed: Federation, ledger: Ledger, state: StateDict, last: Evaluation | None = None
                     ) -> Evaluation:
    """The final model's evaluation: the last round's when it was evaluated in this process, else computed
    (a run resumed after its last round), checked by the divergence guard."""
    if last is not None:
        return last
    final = fed.evaluate(state, probe=fed.cfg.evaluation.linear_probe)
    ledger.finish(final.mm_acc)
    return final
