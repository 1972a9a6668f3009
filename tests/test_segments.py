"""The round policy and a federation run as separate steps through a store (what the pipeline's pods do)."""

import pytest
import torch

from fedcmi.divergence import Diverged
from fedcmi.errors import refusal
from fedcmi.io import load_state, read_json
from fedcmi.outputs import HISTORY
from fedcmi.round.schedule import Schedule
from fedcmi.runners.engine import train
from fedcmi.runners.store import DIVERGED, MODEL, StoreError, begin, conclude, finish, status, train_worker


def _run_steps(cfg, store, tmp, per_worker: int, rounds: range | None = None):
    """What one pipeline run does, in this process: begin, then per round (from 1) the workers and conclude."""
    policy = Schedule(cfg)
    model = tmp / "begin.safetensors"
    start = begin(cfg, store, model)
    for rnd in rounds if rounds is not None else range(start + 1, cfg.federation.rounds + 1):
        dirs = []
        for w in range(policy.workers(per_worker)):
            d = tmp / f"r{rnd}w{w}"
            train_worker(cfg, model, rnd, w, per_worker, d, progress=lambda _: None)
            dirs.append(d)
        out = tmp / f"global{rnd}.safetensors"
        conclude(cfg, store, model, dirs, rnd, out)
        model = out
    return model


def test_workers_split_a_round_into_runs_of_the_sorted_sample(tiny):
    cfg = tiny(federation={"rounds": 4, "clients_per_round": 3}, evaluation={"every": 3})
    policy = Schedule(cfg)
    assert policy.workers(2) == 2 and policy.workers(1) == 3 and policy.workers(5) == 1
    for rnd in range(1, 5):
        assert [c for w in range(2) for c in policy.clients_of_worker(rnd, w, 2)] == policy.clients(rnd)
    assert [policy.evaluates(r) for r in range(1, 5)] == [False, False, True, True]  # every 3, and the last


def test_steps_through_a_store_equal_the_engine_and_a_retried_conclude_commits_nothing_twice(tiny, tmp_path):
    cfg = tiny(federation={"rounds": 3, "clients_per_round": 3})
    engine = train(cfg, tmp_path / "engine", progress=False)
    store = tmp_path / "store"
    _run_steps(cfg, store, tmp_path / "a", per_worker=2, rounds=range(1, 3))  # a run of two rounds
    assert status(cfg, store) == {"completed_rounds": 2, "rounds": 3, "complete": False}
    assert finish(cfg, store, tmp_path / "final.safetensors") is None
    _run_steps(cfg, store, tmp_path / "b", per_worker=2)  # the next run continues after round 2
    # a retried conclude of round 3 (its pod lost after committing) returns the committed round
    again = conclude(cfg, store, tmp_path / "b" / "begin.safetensors", [tmp_path / "b" / "r3w0", tmp_path / "b" / "r3w1"],
                     3, tmp_path / "again.safetensors")
    assert again is not None and again.round == 3
    final = finish(cfg, store, tmp_path / "final.safetensors")
    assert final is not None and [h["round"] for h in read_json(store / HISTORY)] == [1, 2, 3]
    state, _ = load_state(store / MODEL)
    assert all(torch.equal(state[k], engine.state[k]) for k in state)
    assert final.mm_acc == engine.final.mm_acc


def test_a_store_of_another_federation_is_refused(tiny, tmp_path):
    cfg = tiny(federation={"rounds": 2, "clients_per_round": 2})
    store = tmp_path / "store"
    _run_steps(cfg, store, tmp_path / "a", per_worker=1, rounds=range(1, 2))
    other = cfg.model_copy(update={"seed": cfg.seed + 1})
    with pytest.raises(StoreError, match="another run name") as caught:
        begin(other, store, tmp_path / "x.safetensors")
    assert refusal(caught.value) is not None  # a resubmitted run would meet it again: the driver stops
    # a store behind what the driver's earlier runs committed (removed and started again) is refused
    with pytest.raises(StoreError, match="holds 1 committed rounds, behind the 2 .* removed or replaced") as caught:
        begin(cfg, store, tmp_path / "x.safetensors", expect=2)
    assert refusal(caught.value) is not None
    assert begin(cfg, store, tmp_path / "x.safetensors", expect=1) == 1


def test_a_diverged_federation_is_not_retried(tiny, tmp_path):
    """Every update NaN: the round diverges; the store remembers it, so a retry or a later run fails fast."""
    cfg = tiny(federation={"rounds": 2, "clients_per_round": 2}, optim={"lr": 1e30})
    store = tmp_path / "store"
    with pytest.raises(Diverged):
        _run_steps(cfg, store, tmp_path / "a", per_worker=1)
    assert "diverged" in read_json(store / DIVERGED)["reason"]
    with pytest.raises(Diverged, match="stopped in an earlier run") as caught:
        begin(cfg, store, tmp_path / "x.safetensors")
    assert refusal(caught.value) is not None
