"""Each algorithm's characteristic effect on one client's update, measured on tiny data: each test fails
when that effect is removed (FedProx ignoring mu, OGM-GE's hook doing nothing, a FedCMI term dropped)."""

from __future__ import annotations

import pytest
import torch

from fedcmi.round.update import StateDict


def _update(cfg, cid: int = 0, rnd: int = 1, state: StateDict | None = None):
    """Client ``cid``'s update in round ``rnd`` (from 1) from the seeded initial model (or ``state``), and that
    start."""
    from fedcmi.data import DataModule
    from fedcmi.federation import Federation
    from fedcmi.partition import load_partition

    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    start = state if state is not None else fed.initial_state()
    update = fed.train_client(start, cid, rnd)
    assert update is not None
    return update, start


def _distance(a: StateDict, b: StateDict, prefix: str = "") -> float:
    return sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a
               if k.startswith(prefix) and a[k].is_floating_point()) ** 0.5


def _with(cfg, **dotted):
    from fedcmi.config import apply_overrides, config_from_dict

    return config_from_dict(apply_overrides(cfg.to_dict(), [f"{k}={v}" for k, v in dotted.items()]))


def test_fedprox_pulls_the_update_toward_the_global_model_more_as_mu_grows(tiny):
    cfg = tiny(algorithm={"name": "fedprox"}, federation={"local_epochs": 3}, optim={"lr": 0.1})
    drift = {}
    for mu in (0.0, 0.1, 1.0):
        update, start = _update(_with(cfg, **{"algorithm.mu": mu}))
        drift[mu] = _distance(update.state, start)
        if mu > 0:
            assert "prox" in update.metrics
    assert drift[0.0] > drift[0.1] > drift[1.0] > 0, drift


def test_ogm_ge_scales_the_leading_encoders_gradient_by_its_coefficient(tiny):
    """One SGD step (one batch, no momentum history, no weight decay): with modulation the leading
    modality's encoder moves by exactly its coefficient times the unmodulated step, the other encoder
    exactly as unmodulated."""
    cfg = tiny(algorithm={"name": "ogm_ge", "ogm": {"noise": False}},
               federation={"local_epochs": 1, "batch_size": 1000}, optim={"weight_decay": 0.0})
    plain, start = _update(_with(cfg, **{"algorithm.ogm.alpha": 0.0}))  # alpha 0: both coefficients are 1
    modulated, _ = _update(_with(cfg, **{"algorithm.ogm.alpha": 5.0}))
    coeffs = {m: modulated.metrics[f"coeff_{m}"] for m in ("audio", "visual")}
    leader = min(coeffs, key=lambda m: coeffs[m])
    other = "visual" if leader == "audio" else "audio"
    assert coeffs[leader] < 0.99 and coeffs[other] == 1.0, coeffs
    for name in start:
        if not name.startswith("encoders.") or not start[name].is_floating_point():
            continue
        step_plain = plain.state[name] - start[name]
        step_mod = modulated.state[name] - start[name]
        scale = coeffs[leader] if name.startswith(f"encoders.{leader}.") else 1.0
        torch.testing.assert_close(step_mod, scale * step_plain, rtol=1e-4, atol=1e-7)


def test_ogm_ge_noise_perturbs_only_the_modulated_encoder(tiny):
    cfg = tiny(algorithm={"name": "ogm_ge", "ogm": {"alpha": 5.0}},
               federation={"local_epochs": 1, "batch_size": 1000}, optim={"weight_decay": 0.0})
    quiet, start = _update(_with(cfg, **{"algorithm.ogm.noise": False}))
    noisy, _ = _update(_with(cfg, **{"algorithm.ogm.noise": True}))
    coeffs = {m: noisy.metrics[f"coeff_{m}"] for m in ("audio", "visual")}
    leader = min(coeffs, key=lambda m: coeffs[m])
    other = "visual" if leader == "audio" else "audio"
    assert _distance(noisy.state, quiet.state, f"encoders.{leader}.") > 0
    assert _distance(noisy.state, quiet.state, f"encoders.{other}.") == 0


@pytest.mark.parametrize("switch", ["algorithm.fedcmi.w_uni=0.0", "algorithm.fedcmi.lambda_inf=0.0",
                                    "algorithm.fedcmi.infiltration=false", "algorithm.fedcmi.class_temperature=false",
                                    "algorithm.mu=0.1"])
def test_each_fedcmi_term_changes_the_update(tiny, switch):
    """Past the warm-up (round 2 with warmup_epochs null, warmup_rounds 1), every term and switch of the
    client loss changes what a multimodal client sends."""
    cfg = tiny(algorithm={"name": "fedcmi", "fedcmi": {"warmup_epochs": None, "warmup_rounds": 1}},
               federation={"local_epochs": 1})
    base, start = _update(cfg, rnd=2)
    assert base.metrics["inf"] > 0 and base.metrics["uni"] > 0
    key, value = switch.split("=")
    changed, _ = _update(_with(cfg, **{key: value}), rnd=2, state=start)
    assert _distance(changed.state, base.state) > 1e-6, switch


def test_fedcmi_warm_up_round_has_no_infiltration_term(tiny):
    cfg = tiny(algorithm={"name": "fedcmi", "fedcmi": {"warmup_epochs": None, "warmup_rounds": 1}},
               federation={"local_epochs": 1})
    warm, start = _update(cfg, rnd=1)
    off, _ = _update(_with(cfg, **{"algorithm.fedcmi.lambda_inf": 0.0}), rnd=1, state=start)
    assert "inf" not in warm.metrics
    assert _distance(warm.state, off.state) == 0.0


def test_unimodal_trains_only_its_modality_and_skips_clients_without_it(tiny):
    cfg = tiny(algorithm={"name": "unimodal", "modality": "visual"})
    update, start = _update(cfg)
    assert set(update.state) == set(start) and all(k.startswith(("encoders.visual.", "head.")) for k in start)
    from fedcmi.algorithms import get_strategy

    strategy = get_strategy(cfg)
    assert strategy.participates(("audio", "visual")) and not strategy.participates(("audio",))
    assert strategy.batch_modalities(("audio", "visual")) == ("visual",)


def test_the_registry_refuses_an_unknown_name_with_the_known_ones():
    from fedcmi.algorithms import strategy_class
    from fedcmi.registry import ALGORITHMS

    with pytest.raises(ValueError, match="known: .*fedavg, .*fedprox"):
        strategy_class("fedvag")
    assert {"fedavg", "fedprox", "unimodal", "ogm_ge", "fedcmi"} <= set(ALGORITHMS.names())
