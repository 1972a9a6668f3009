"""Deadlines and over-selection: the seeded latency model, the round's late clients, and the same verdict
whether the round runs in the engine, with worker processes, or as a pipeline's steps through a store."""

import pytest
import torch
from conftest import tiny_config
from test_segments import _run_steps

from fedcmi.config import ConfigError
from fedcmi.data import DataModule
from fedcmi.federation import Federation
from fedcmi.io import load_state, read_json
from fedcmi.outputs import HISTORY
from fedcmi.partition import load_partition
from fedcmi.round.close import close_round
from fedcmi.round.deadline import cutoff, report_times
from fedcmi.round.record import RoundRecord
from fedcmi.round.schedule import Schedule
from fedcmi.round.server import RoundFailed
from fedcmi.round.update import UpdateLate
from fedcmi.round.update_files import read_update, write_update
from fedcmi.runners.engine import train
from fedcmi.runners.store import MODEL, finish

LATENCY = {"model": "lognormal", "seconds_per_example": 0.05, "stragglers": [1], "straggler_slowdown": 20.0}
SLOW = {"partition": {"num_clients": 6},
        "federation": {"rounds": 3, "clients_per_round": 2, "over_selection": 1.0, "deadline": 4.0,
                       "latency": LATENCY}}


def _fed(cfg):
    return Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))


def _same(a, b) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("federation, says", [
    ({"deadline": 3.0}, "federation.deadline need(s) a latency model"),
    ({"over_selection": 0.5}, "federation.over_selection need(s) a latency model"),
    ({"over_selection": 3.0, "latency": {"model": "lognormal"}}, "samples 8 clients a round, more than "
     "partition.num_clients (4)"),
    ({"latency": {"model": "lognormal", "stragglers": [7]}}, "federation.latency.stragglers names clients [7]"),
    ({"latency": {"model": "lognormal", "availability": 0}}, "federation.latency.availability"),
    ({"deadline": -1}, "federation.deadline"),
])
def test_a_contradiction_is_one_error_naming_the_fields(tmp_path, federation, says):
    with pytest.raises(ConfigError) as err:
        tiny_config(tmp_path, federation=federation)
    assert says in str(err.value) and "\n" not in str(err.value)


def test_the_latency_model_is_off_by_default_and_hidden_from_mlflow(tmp_path):
    cfg = tiny_config(tmp_path)
    assert cfg.federation.latency.model == "none" and cfg.sampled_per_round == cfg.federation.clients_per_round
    assert not any(k.startswith("federation.latency.") and k != "federation.latency.model"
                   for k in cfg.applicable())


def test_report_times_are_seeded_by_round_alone_and_a_straggler_is_slower(tiny):
    cfg = tiny(**SLOW)
    part = load_partition(cfg.partition.file)
    first = [report_times(cfg, part, r) for r in (1, 2, 3)]
    assert first == [report_times(cfg, part, r) for r in (1, 2, 3)]  # the same in every process
    assert first[0] != first[1]  # each round its own jitter
    fast = tiny_config(cfg.output.dir.parent, **{**SLOW, "federation": {**SLOW["federation"],
                                                                          "latency": {**LATENCY, "stragglers": []}}})
    plain = report_times(fast, part, 1)
    assert first[0][1] == pytest.approx(20 * plain[1]) and first[0][0] == plain[0]


def test_over_selection_keeps_the_first_to_report_and_the_deadline_closes_the_round(tiny):
    cfg = tiny(**SLOW)
    fed = _fed(cfg)
    for rnd in (1, 2, 3):
        sampled = Schedule(cfg).clients(rnd)
        assert len(sampled) == 4  # 2 a round, and 100% over-selected
        times = report_times(cfg, fed.partition, rnd)
        cut = cutoff(cfg, fed.partition, rnd, sampled, fed.strategy.participates)
        in_time = sorted((times[c], c) for c in sampled if times[c] is not None and times[c] <= 4.0)
        assert sorted(set(sampled) - set(cut.late)) == sorted(c for _, c in in_time[:2])
        for c, why in cut.late.items():
            assert why.startswith(f"client {c}: late: reports at")
            assert ("deadline of 4 s" in why) == (times[c] > 4.0)
        if 1 in sampled:
            assert "deadline" in cut.late[1]  # the straggler never makes it
        assert cut.closes == (in_time[1][0] if len(in_time) > 2 else 4.0 if cut.late else in_time[-1][0])


def test_late_clients_are_counted_apart_never_trained_and_their_updates_discarded(tiny, tmp_path):
    cfg = tiny(**SLOW)
    trained = []
    real = Federation.train_client

    def spy(self, state, cid, rnd):
        trained.append((rnd, cid))
        return real(self, state, cid, rnd)

    Federation.train_client = spy  # type: ignore[method-assign]
    try:
        engine = train(cfg, tmp_path / "engine", progress=False)
    finally:
        Federation.train_client = real  # type: ignore[method-assign]
    late = {(r.round, c) for r in engine.history for c in r.participation.late}
    assert late and not late & set(trained)
    for rec in engine.history:
        p = rec.participation
        assert not p.rejected and len(p.accepted) <= 2
        assert sorted(p.accepted + list(p.late) + p.idle) == p.sampled
        assert rec.timing.simulated is not None and RoundRecord.from_json(rec.to_json()).to_json() == rec.to_json()

    # an update that comes anyway for a late client is never read: the round is the same without it
    fed = _fed(cfg)
    state = fed.initial_state()
    rec = engine.history[0]
    straggler = min(rec.participation.late)
    sampled = Schedule(cfg).clients(1)
    outcomes = [(c, (lambda c=c: fed.train_client(state, c, 1))) for c in sampled]
    closed = close_round(fed, state, sampled, outcomes, 1, evaluate=False)
    assert closed.record.participation.late == rec.participation.late and straggler not in closed.record.participation.accepted
    again = close_round(fed, state, sampled, [o for o in outcomes if o[0] not in rec.participation.late], 1,
                        evaluate=False)
    assert _same(closed.state, again.state)


def test_every_client_late_fails_the_round_naming_them(tiny, tmp_path):
    cfg = tiny(**{**SLOW, "federation": {**SLOW["federation"], "deadline": 1e-6}})
    with pytest.raises(RoundFailed, match=r"round 1: 0 valid update\(s\), .*; late: \["):
        train(cfg, tmp_path / "engine", progress=False)


def test_a_late_marker_file_reads_as_late_and_a_forged_one_is_refused(tmp_path):
    write_update(tmp_path / "c.safetensors", 2, 3, None, late="client 3: late: reports at 9 s")
    with pytest.raises(UpdateLate, match="reports at 9 s"):
        read_update(tmp_path / "c.safetensors", 2, 3)


def test_worker_processes_and_a_pipelines_steps_give_the_engines_model_with_a_slow_client(tiny, tmp_path):
    cfg = tiny(**SLOW)
    engine = train(cfg, tmp_path / "engine", progress=False)
    pooled = train(cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"workers": 2})}),
                   tmp_path / "pooled", progress=False)
    assert _same(engine.state, pooled.state)
    assert [r.participation for r in pooled.history] == [r.participation for r in engine.history]
    store = tmp_path / "store"
    _run_steps(cfg, store, tmp_path / "steps", per_worker=3)
    assert finish(cfg, store, tmp_path / "final.safetensors") is not None
    assert _same(load_state(store / MODEL)[0], engine.state)
    history = read_json(store / HISTORY)
    assert [h["late"] for h in history] == [r.to_json()["late"] for r in engine.history]
    assert [h["simulated_seconds"] for h in history] == [r.to_json()["simulated_seconds"] for r in engine.history]
    # `fedcmi sample`'s verdict for a file-to-file round is the same
    from fedcmi.runners.files import late_step
    assert late_step(cfg, 2, Schedule(cfg).clients(2)) == engine.history[1].participation.late
    # the pods wrote a late marker for each late client instead of training it
    marked = {int(p.name[7:12]) for p in (tmp_path / "steps").glob("r1w*/client_*.safetensors")
              if load_state(p)[1].get("kind") == "late"}
    assert marked == set(engine.history[0].participation.late)
