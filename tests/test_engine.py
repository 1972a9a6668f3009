"""The engine: every algorithm end to end, determinism, resume, and the file steps."""

from __future__ import annotations

import json

import pytest
import torch

from fedcmi.algorithms.fedcmi import FedCMIOptions
from fedcmi.checkpoint import ResumeError
from fedcmi.io import load_state, save_state
from fedcmi.outputs import TrainFiles
from fedcmi.runners.engine import train
from fedcmi.runners.files import aggregate_step, client_train_step, evaluate_step, init_step, sample_step


def state_distance(a, b) -> float:
    """Largest absolute elementwise difference between two states."""
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a
                if a[k].is_floating_point() and a[k].numel()), default=0.0)


def flat(history) -> list[dict]:
    """The history as history.json holds it."""
    return [r.to_json() for r in history]

RUNS = {
    "fedavg": {},
    "fedprox": {"algorithm": {"name": "fedprox"}},
    "unimodal-audio": {"algorithm": {"name": "unimodal", "modality": "audio"}},
    "unimodal-visual": {"algorithm": {"name": "unimodal", "modality": "visual"}},
    "ogm_ge": {"algorithm": {"name": "ogm_ge"}},
    "fedcmi": {"algorithm": {"name": "fedcmi"}},
    "fedcmi-round-dominance": {"algorithm": {"name": "fedcmi", "fedcmi": {"dominance": "round"}}},
    "fedcmi-warmup-epochs": {"algorithm": {"name": "fedcmi", "fedcmi": {"warmup_epochs": 1}}},
    "fedcmi-no-infiltration": {"algorithm": {"name": "fedcmi", "fedcmi": {"infiltration": False}}},
    "fedcmi-no-class-temperature": {"algorithm": {"name": "fedcmi", "fedcmi": {"class_temperature": False}}},
    "fedcmi-prox": {"algorithm": {"name": "fedcmi", "mu": 0.01}},
    "fedcmi-one-projector": {"algorithm": {"name": "fedcmi"}, "model": {"projectors": "one"}},
    "fedcmi-hetero-film": {"algorithm": {"name": "fedcmi"}, "model": {"fusion": "film"},
                           "partition": {"multimodal_fraction": 0.5}},
    "fedavg-hetero-gated": {"model": {"fusion": "gated"}, "partition": {"multimodal_fraction": 0.5}},
    "fedcmi-dirichlet-sum": {"algorithm": {"name": "fedcmi"}, "model": {"fusion": "sum"},
                             "partition": {"scheme": "dirichlet", "alpha": 1.0}},
    "fedcmi-bf16-mixed": {"algorithm": {"name": "fedcmi"}, "optim": {"precision": "bf16-mixed"}},
    "ogm_ge-16-mixed": {"algorithm": {"name": "ogm_ge"}, "optim": {"precision": "16-mixed"}},
}


@pytest.mark.parametrize("name", sorted(RUNS))
def test_every_algorithm_runs_end_to_end(tiny, name):
    cfg = tiny(**{"algorithm": {"name": "fedavg"}, **RUNS[name]})
    res = train(cfg, progress=False)
    assert len(res.history) == cfg.federation.rounds
    assert 0.0 <= res.final.mm_acc <= 1.0
    init = load_state_of_fresh_model(cfg)
    assert state_distance(init, res.state) > 0, "training changed nothing"
    history = flat(res.history)
    if (cfg.algorithm.name == "fedcmi" and cfg.algorithm.options(FedCMIOptions).infiltration
            and cfg.partition.multimodal_fraction == 1):
        # round 2 is past the warm-up: clients measured dominance and used class temperatures
        assert "train_inf" in history[1] and "train_inf" not in history[0]
        assert any(k.startswith("dominant_frac_") for k in history[1])
    files = TrainFiles(cfg, cfg.output.dir / "train")
    files.log_final(res.final, res.history)
    assert json.loads(files.paths["metrics"].read_text())["mm_acc"] == res.final.mm_acc


def load_state_of_fresh_model(cfg):
    from fedcmi.algorithms import build_model
    from fedcmi.data import DataModule

    return build_model(cfg, DataModule(cfg.data.prepared_dir).spec).state_dict()


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains_the_same_model_in_lower_precision(tiny, precision):
    full = tiny(federation={"rounds": 1})
    low = tiny(federation={"rounds": 1}, optim={"precision": precision})
    a = train(full, full.output.dir / "32", progress=False)
    b = train(low, low.output.dir / precision, progress=False)
    assert all(torch.isfinite(v).all() for v in b.state.values() if v.is_floating_point())
    moved = state_distance(load_state_of_fresh_model(full), a.state)
    assert 0 < state_distance(a.state, b.state) < moved / 2, "autocast not applied, or a different training"


def test_same_seed_same_metrics_and_model(tiny):
    cfg = tiny(algorithm={"name": "fedcmi"})
    a = train(cfg, cfg.output.dir / "a", progress=False)
    b = train(cfg, cfg.output.dir / "b", progress=False)
    assert a.history[-1].evaluation.mm_acc == b.history[-1].evaluation.mm_acc
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in flat(h)]  # noqa: E731
    assert strip(a.history) == strip(b.history)


def test_another_seed_gives_another_model(tiny):
    cfg = tiny()
    a = train(cfg, cfg.output.dir / "a", progress=False)
    b = train(cfg.model_copy(update={"seed": cfg.seed + 1}), cfg.output.dir / "b", progress=False, resume="never")
    assert state_distance(a.state, b.state) > 0


def test_resume_after_round_k_ends_with_the_uninterrupted_model(tiny):
    cfg = tiny(algorithm={"name": "fedcmi"}, federation={"rounds": 4, "clients_per_round": 2, "batch_size": 16})
    full = train(cfg, cfg.output.dir / "full", progress=False)
    part_cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})})
    stopped = train(part_cfg, cfg.output.dir / "resumed", progress=False)
    assert len(stopped.history) == 2
    resumed = train(cfg, cfg.output.dir / "resumed", progress=False, resume="must")
    assert resumed.resumed_from == 2
    assert all(torch.equal(full.state[k], resumed.state[k]) for k in full.state)
    assert [r.round for r in resumed.history] == [1, 2, 3, 4]


def test_resume_refuses_a_checkpoint_of_other_settings(tiny):
    cfg = tiny()
    train(cfg, cfg.output.dir / "r", progress=False)
    other = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 0.123})})
    with pytest.raises(ResumeError, match="other settings"):
        train(other, cfg.output.dir / "r", progress=False, resume="must")
    res = train(other, cfg.output.dir / "r", progress=False, resume="auto")  # starts over with a warning
    assert res.resumed_from == 0


@pytest.mark.parametrize("algo", ["fedavg", "fedcmi"])
def test_file_steps_reproduce_the_engine_bitwise(tiny, tmp_path, algo):
    cfg = tiny(algorithm={"name": algo}, partition={"num_clients": 4, "min_samples": 4, "multimodal_fraction": 0.5})
    engine = train(cfg, progress=False)
    g = init_step(cfg, tmp_path / "g0.safetensors")
    for rnd in range(1, cfg.federation.rounds + 1):
        ups = [client_train_step(cfg, g, cid, rnd, tmp_path / f"u{rnd}_{cid}.safetensors")
               for cid in sample_step(cfg, rnd)]
        g, summary = aggregate_step(cfg, g, [u for u in ups if u], rnd, tmp_path / f"g{rnd}.safetensors")
        assert summary.round == rnd
    state, meta = load_state(g)
    assert meta["round"] == cfg.federation.rounds
    assert all(torch.equal(engine.state[k], state[k]) for k in state)
    metrics = evaluate_step(cfg, g, tmp_path / "m.json")
    assert metrics.mm_acc == engine.history[-1].evaluation.mm_acc


def test_aggregate_step_rejects_a_nan_update_and_keeps_the_round(tiny, tmp_path):
    cfg = tiny(federation={"rounds": 1, "clients_per_round": 2, "batch_size": 16, "min_clients": 1})
    g = init_step(cfg, tmp_path / "g0.safetensors")
    first, second = sample_step(cfg, 1)
    good = client_train_step(cfg, g, first, 1, tmp_path / "u0.safetensors")
    bad_state, meta = load_state(client_train_step(cfg, g, second, 1, tmp_path / "u1.safetensors"))
    key = next(iter(bad_state))
    bad_state[key] = torch.full_like(bad_state[key], float("nan"))
    save_state(tmp_path / "u1.safetensors", bad_state, meta)
    _, rec = aggregate_step(cfg, g, [good, tmp_path / "u1.safetensors"], 1, tmp_path / "g1.safetensors")
    summary = rec.to_json()
    assert summary["accepted"] == [first]
    assert "NaN" in summary["rejected"][str(second)]


def test_a_failing_client_is_rejected_and_too_few_valid_updates_fail_the_round(tiny, monkeypatch):
    from fedcmi.data import DataModule
    from fedcmi.federation import Federation
    from fedcmi.partition import load_partition
    from fedcmi.round.close import close_round
    from fedcmi.round.outcomes import client_outcomes
    from fedcmi.round.schedule import sample_clients
    from fedcmi.round.server import RoundFailed

    cfg = tiny(federation={"rounds": 1, "clients_per_round": 2, "batch_size": 16, "min_clients": 1})
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    state = fed.initial_state()
    clients = sample_clients(cfg, 1)
    real = fed.train_client

    def flaky(global_state, cid, rnd):
        if cid == clients[0]:
            raise RuntimeError("GPU fell off the bus")
        return real(global_state, cid, rnd)

    monkeypatch.setattr(fed, "train_client", flaky)
    res = close_round(fed, state, clients, client_outcomes(fed, state, clients, 1), 1).record.participation
    assert res.accepted == [clients[1]] and "GPU fell off the bus" in res.rejected[clients[0]]
    fed.cfg = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"min_clients": 2})})
    with pytest.raises(RoundFailed, match="1 valid update"):
        close_round(fed, state, clients, client_outcomes(fed, state, clients, 1), 1)


@pytest.mark.parametrize("mode, per_client", [("batch", 3), ("round", 1)])
def test_class_temperatures_are_taken_once_per_round_in_either_dominance_mode(tiny, monkeypatch, mode, per_client):
    """The reference code decides the direction per batch but takes the temperatures once per round, from the
    received model; computing them per batch would call the formula once per batch."""
    import fedcmi.algorithms.fedcmi as impl

    calls = []
    real = impl.class_temperatures
    monkeypatch.setattr(impl, "class_temperatures", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = tiny(algorithm={"name": "fedcmi", "fedcmi": {"dominance": mode}}, federation={"local_epochs": 2})
    res = train(cfg, progress=False)
    distilling = [h for h in flat(res.history) if "train_inf" in h]
    assert distilling, "no round distilled"
    clients = sum(len(h["accepted"]) for h in distilling)
    assert len(calls) == per_client * clients  # batches per client: 2 epochs x 2-3 batches, far more than 3
    assert "temperature_class_0" in distilling[0] and "dominant_frac_audio" in distilling[0]


def test_warm_up_in_epochs_delays_distillation(tiny):
    cfg = tiny(algorithm={"name": "fedcmi", "fedcmi": {"warmup_epochs": 2, "warmup_rounds": 0}},
               federation={"rounds": 3, "local_epochs": 1})
    res = train(cfg, progress=False)
    assert ["train_inf" in h for h in flat(res.history)] == [False, False, True]


def test_the_same_state_gives_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its metadata map in a per-process order; the files must not differ for it (DVC
    would see a changed model and rerun everything after it)."""
    import subprocess
    import sys

    code = ("import sys, torch; from fedcmi.io import save_state; "
            "save_state(sys.argv[1], {'w': torch.arange(6.).view(2, 3), 'n': torch.tensor([7])}, "
            "{'kind': 'global', 'round': 3, 'algorithm': 'fedcmi'})")
    files = [tmp_path / f"m{i}.safetensors" for i in range(8)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True)
    assert len({f.read_bytes() for f in files}) == 1
