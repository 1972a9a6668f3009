"""The divergence guard: runs that blow up or fall to chance stop with a clear message."""

from __future__ import annotations

import math

import numpy as np
import pytest
from test_cli import _params, fedcmi

from fedcmi.divergence import Diverged, DivergenceGuard, chance_accuracy
from fedcmi.round.record import RoundRecord
from fedcmi.runners.engine import train


def rec(**flat) -> RoundRecord:
    """A round's record from its flat figures, as history.json holds it."""
    return RoundRecord.from_json(flat)


def test_chance_is_the_most_frequent_class():
    assert chance_accuracy(np.array([0, 0, 0, 1]), 3) == 0.75
    assert chance_accuracy(np.arange(12) % 6, 6) == pytest.approx(1 / 6)


def test_a_fall_to_chance_is_caught_after_patience_evaluations():
    g = DivergenceGuard(chance=0.2, lr=0.4, patience=3)
    for rnd, acc in enumerate([0.3, 0.6, 0.7], 1):
        assert g.check_round(rec(round=rnd, mm_acc=acc, train_loss=1.0)) is None
    assert g.check_round(rec(round=4, mm_acc=0.21, train_loss=1.0)) is None
    assert g.check_round(rec(round=5, mm_acc=0.2, train_loss=1.0)) is None
    reason = g.check_round(rec(round=6, mm_acc=0.19, train_loss=1.0))
    assert reason is not None and "fell from 0.700" in reason and "round 6" in reason
    assert "optim.lr (now 0.4; try 0.1)" in reason


def test_a_recovery_resets_the_count_and_slow_starters_are_not_diverged():
    g = DivergenceGuard(chance=0.2, lr=0.1, patience=2)
    for rnd, acc in enumerate([0.2, 0.2, 0.2, 0.2, 0.5, 0.2, 0.6, 0.2], 1):
        assert g.check_round(rec(round=rnd, mm_acc=acc)) is None
    reason, warning = DivergenceGuard(chance=0.2, lr=0.1).check_final(0.2)
    assert reason is None and "has not learned" in warning


def test_non_finite_or_runaway_loss_and_a_final_fall():
    assert "became nan" in DivergenceGuard(0.2, 0.1).check_round(rec(round=2, train_loss=math.nan))
    g = DivergenceGuard(0.2, 0.1)
    assert g.check_round(rec(round=1, train_loss=1.8)) is None
    assert g.check_round(rec(round=2, train_loss=50.0)) is None
    assert "ran away" in g.check_round(rec(round=3, train_loss=1e4))
    g = DivergenceGuard(0.2, 0.1)
    g.check_round(rec(round=1, mm_acc=0.8))
    reason, _ = g.check_final(0.2)
    assert "fell from 0.800" in reason


def test_a_diverging_run_stops_with_the_advice_and_keeps_the_last_good_round(tiny):
    cfg = tiny(optim={"lr": 1e4}, federation={"rounds": 3})
    with pytest.raises(Diverged, match=r"lower optim.lr \(now 10000; try 2500\)"):
        train(cfg, progress=False)


def test_the_cli_exits_3_with_one_message_when_training_diverges(tmp_path):
    _params(tmp_path)
    for cmd in ("prepare", "partition"):
        assert fedcmi(cmd, cwd=tmp_path).returncode == 0
    r = fedcmi("train", "--no-progress", "--set", "optim.lr=10000", "--set", "federation.rounds=3", cwd=tmp_path)
    assert r.returncode == 3, r.stderr
    assert "diverged" in r.stderr and "lower optim.lr" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "outputs" / "train" / "model.safetensors").exists()


def test_a_collapse_is_caught_even_if_never_above_chance():
    """FedCMI at lr 0.05 on the default setting (seed 1) sat at 0.167 for 19 rounds: every encoder unit dead, the
    logits the same for every input (spread 4e-7)."""
    g = DivergenceGuard(chance=1 / 6, lr=0.05, patience=3)
    assert g.check_round(rec(round=1, mm_acc=0.24, mm_logit_spread=0.05)) is None
    assert g.check_round(rec(round=2, mm_acc=1 / 6, mm_logit_spread=4e-7)) is None
    assert g.check_round(rec(round=3, mm_acc=1 / 6, mm_logit_spread=4e-7)) is None
    reason = g.check_round(rec(round=4, mm_acc=1 / 6, mm_logit_spread=4e-7))
    assert reason is not None and "no longer depends on the input" in reason
    # at chance, one answer for every sample, but still reading its input: a slow start, not a collapse
    g = DivergenceGuard(chance=1 / 6, lr=0.05, patience=2)
    for rnd in range(1, 6):
        assert g.check_round(rec(round=rnd, mm_acc=1 / 6, pred_top_frac=1.0, mm_logit_spread=0.01)) is None


def test_evaluation_reports_the_share_of_the_most_predicted_class():
    from fedcmi.metrics import from_logits

    logits = {"mm": np.array([[5.0, 0, 0], [5.0, 0, 0], [5.0, 0, 0], [0, 5.0, 0]])}
    m = from_logits(logits, np.array([0, 1, 2, 1]), 3, ())
    assert m.pred_top_frac == 0.75 and m.mm_acc == 0.5
    assert m.mm_logit_spread > 0.1
    dead = from_logits({"mm": np.full((4, 3), 0.3)}, np.array([0, 1, 2, 1]), 3, ())
    assert dead.mm_logit_spread == 0.0 and dead.pred_top_frac == 1.0


def test_a_round_of_only_non_finite_updates_is_diverged_but_other_failures_are_not(tiny):
    from fedcmi.data import DataModule
    from fedcmi.federation import Federation
    from fedcmi.partition import load_partition
    from fedcmi.round.schedule import sample_clients
    from fedcmi.round.server import RoundDiverged, RoundFailed, ServerPipeline
    from fedcmi.round.update import ClientUpdate

    cfg = tiny(federation={"min_clients": 2})
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    server = ServerPipeline(cfg, fed.strategy, fed.model, fed.partition)

    def aggregate(g, updates, round_no):
        return server.conclude(g, [(u.client_id, lambda u=u: u) for u in updates], round_no,
                               sample_clients(cfg, round_no))

    g = fed.initial_state()
    nan = {k: v.clone().fill_(float("nan")) if v.is_floating_point() else v.clone() for k, v in g.items()}
    mods = tuple(cfg.data.modalities)
    first, second = sample_clients(cfg, 1)
    bad = [ClientUpdate(first, nan, 10, mods), ClientUpdate(second, nan, 10, mods)]
    with pytest.raises(RoundDiverged, match=r"every client's update holds NaN or Inf \(client \d+: .*\); lower optim.lr"):
        aggregate(g, bad, 1)
    huge = {k: v.clone().fill_(1e30) if v.is_floating_point() else v.clone() for k, v in g.items()}
    with pytest.raises(RoundDiverged, match=r"NaN, Inf or a change past the server's bound"):
        aggregate(g, [bad[0], ClientUpdate(second, huge, 10, mods)], 1)
    zero = ClientUpdate(second, dict(g), 0, mods)  # rejected for another reason: the round fails, not diverged
    with pytest.raises(RoundFailed) as info:
        aggregate(g, [bad[0], zero], 1)
    assert not isinstance(info.value, Diverged)
