"""Client-level differential privacy (DP-FedAvg): the accountant against the dp-accounting library, per
modality group; the clip, sum and noise; determinism; the composition and the budget checked at load."""

from __future__ import annotations

import math
import re

import pytest
import torch
from conftest import tiny_config
from dp_accounting import dp_event, rdp

from fedcmi.config import ConfigError
from fedcmi.privacy.accounting import PrivacyBudgetExceeded, accountant
from fedcmi.registry import SAMPLERS
from fedcmi.round.update import ClientUpdate
from fedcmi.runners.engine import train

DP = {"mechanism": "central", "noise_multiplier": 0.05, "clip_norm": 1.0}


def library_epsilon(rate: float, sigma: float, rounds: int, delta: float = 1e-5) -> float:
    acc = rdp.RdpAccountant()
    acc.compose(dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), rounds)
    return acc.get_epsilon(delta)


HALF = [("audio", "visual"), ("audio",), ("audio", "visual"), ("visual",), ("audio", "visual"), ("audio",),
        ("audio", "visual"), ("visual",)]


def test_each_groups_epsilon_is_the_librarys_at_its_rate_and_a_client_composes_its_groups(tmp_path):
    cfg = tiny_config(tmp_path, algorithm={"name": "fedcmi"}, partition={"num_clients": 8},
                      federation={"clients_per_round": 4, "rounds": 30},
                      privacy={**DP, "noise_multiplier": 1.1})
    acc = accountant(cfg, HALF)
    assert acc.groups == ("audio", "visual", "shared")
    assert acc.rates == {"audio": 0.5, "visual": 0.5, "shared": 0.5}  # uniform sampling: 4 of 8
    for g in acc.groups:
        assert acc.group_epsilon(g, 30) == pytest.approx(library_epsilon(0.5, 1.1, 30), rel=1e-12)
    # a multimodal client's change reaches three groups through one draw: noise 1.1 / sqrt(3) at rate 0.5
    assert acc.client_epsilon(30) == pytest.approx(library_epsilon(0.5, 1.1 / math.sqrt(3), 30), rel=1e-12)
    figures = acc.figures(12)
    assert figures["privacy_epsilon_audio"] == pytest.approx(library_epsilon(0.5, 1.1, 12), rel=1e-12)
    assert figures["privacy_epsilon"] > figures["privacy_epsilon_audio"]


def test_a_modality_aware_sampler_draws_a_rare_modalitys_holders_more_often_and_its_group_pays_for_it(tmp_path):
    holdings = [("audio",)] * 7 + [("audio", "visual")]  # one client of eight holds the visual modality
    cfg = tiny_config(tmp_path, algorithm={"name": "fedavg", "aggregation": "modality_aware"},
                      partition={"num_clients": 8}, federation={"clients_per_round": 2, "rounds": 20,
                                                                 "sampler": "modality_aware"},
                      privacy={**DP, "noise_multiplier": 1.0})
    inclusion = SAMPLERS.get("modality_aware")(cfg).inclusion(8, 2, holdings)
    assert inclusion[7] == 1.0 and all(p < 0.3 for p in inclusion[:7])  # the only visual holder: every round
    acc = accountant(cfg, holdings)
    assert acc.rates["visual"] == 1.0 and acc.rates["audio"] == 1.0 and acc.rates["shared"] == 1.0
    uniform = accountant(tiny_config(tmp_path, algorithm={"name": "fedavg", "aggregation": "modality_aware"},
                                     partition={"num_clients": 8}, federation={"clients_per_round": 2, "rounds": 20},
                                     privacy={**DP, "noise_multiplier": 1.0}), holdings)
    assert uniform.rates["visual"] == 0.25
    assert acc.group_epsilon("visual", 20) == pytest.approx(library_epsilon(1.0, 1.0, 20), rel=1e-12)
    assert uniform.group_epsilon("visual", 20) == pytest.approx(library_epsilon(0.25, 1.0, 20), rel=1e-12)
    assert acc.group_epsilon("visual", 20) > 2 * uniform.group_epsilon("visual", 20)


def test_a_target_epsilon_chooses_the_noise_that_ends_the_run_there(tmp_path):
    cfg = tiny_config(tmp_path, algorithm={"name": "fedavg"}, partition={"num_clients": 8},
                      federation={"clients_per_round": 2, "rounds": 25},
                      privacy={**DP, "noise_multiplier": None, "target_epsilon": 3.0})
    acc = accountant(cfg, [("audio", "visual")] * 8)
    assert acc.groups == ("all",)  # plain aggregation: the model is one group
    assert acc.client_epsilon(25) == pytest.approx(3.0, rel=1e-6) and acc.client_epsilon(25) <= 3.0
    assert library_epsilon(0.25, acc.noise_multiplier * 0.999, 25) > 3.0


def test_the_stage_is_the_unweighted_mean_of_clipped_changes_plus_seeded_noise(tmp_path):
    from fedcmi.privacy.stage import CentralPrivacy
    from fedcmi.round.stage import ServerState

    cfg = tiny_config(tmp_path, algorithm={"name": "fedavg"}, partition={"num_clients": 4},
                      privacy={**DP, "noise_multiplier": 0.0, "clip_norm": 0.5})
    g = {"w": torch.zeros(3), "n": torch.tensor(7)}
    acc = accountant(cfg, [("audio", "visual")] * 4)
    stage = CentralPrivacy(cfg, g, lambda k: None, {}, acc, round_no=1)
    far = ClientUpdate(0, {"w": torch.tensor([3.0, 4.0, 0.0]), "n": torch.tensor(9)}, 100, ("audio", "visual"))
    near = ClientUpdate(1, {"w": torch.tensor([0.0, 0.1, 0.0]), "n": torch.tensor(9)}, 1, ("audio", "visual"))
    for u in (far, near):
        stage.accept(stage.admit(u.client_id, u))
    out = stage.conclude(ServerState(previous=g, weights=g, aux={})).weights
    # the far change clipped to 0.5 along (3, 4); both count the same whatever their sample counts
    assert torch.allclose(out["w"], torch.tensor([0.15, (0.4 + 0.1) / 2, 0.0]))
    assert out["n"] == 7 and stage.clipped == [0]


def _run(tmp_path, name, **privacy):
    from fedcmi.data import DataModule, prepare
    from fedcmi.partition import make_partition, save_partition

    cfg = tiny_config(tmp_path, algorithm={"name": "fedcmi"}, partition={"multimodal_fraction": 0.5},
                      federation={"rounds": 3, "clients_per_round": 3}, privacy={**DP, **privacy})
    if not (tmp_path / "partition.json").is_file():
        prepare(cfg)
        dm = DataModule(cfg.data.prepared_dir)
        save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes),
                       cfg.partition.file)
    return cfg, train(cfg, tmp_path / name, progress=False, resume="never")


def test_dp_runs_are_deterministic_report_epsilon_every_round_and_adapt_their_bound(tmp_path):
    torch.set_num_threads(1)
    cfg, a = _run(tmp_path, "a", clipping="adaptive", adaptive={"count_noise": 0.5})
    _, b = _run(tmp_path, "b", clipping="adaptive", adaptive={"count_noise": 0.5})
    assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)  # the noise is the seed's
    _, plain = _run(tmp_path, "plain", mechanism="none")
    assert not all(torch.equal(a.state[k], plain.state[k]) for k in a.state)
    for rec in a.history:
        assert rec.server["privacy_noise_multiplier"] == 0.05
        for g in ("audio", "visual", "shared"):
            assert rec.server[f"privacy_epsilon_{g}"] > 0
        assert rec.server["privacy_epsilon"] >= rec.server["privacy_epsilon_shared"]
    eps = [rec.server["privacy_epsilon"] for rec in a.history]
    assert eps == sorted(eps) and len(set(eps)) == 3  # it grows with every round
    bounds = [rec.server["privacy_clip_shared"] for rec in a.history]
    assert bounds[0] == 1.0 and bounds[1] != 1.0  # the bound moves from its start


@pytest.mark.parametrize(("settings", "says"), [
    ({"server": {"clip_norm": 2.0}}, "server.clip_norm (2.0) and privacy.mechanism 'central' both clip"),
    ({"server": {"rule": "median"}}, "server.rule 'median' with privacy.mechanism 'central'"),
    ({"algorithm": {"name": "scaffold"}}, "algorithm.name 'scaffold' (control variates) with privacy"),
    ({"privacy": {**DP, "target_epsilon": 2.0}}, "give exactly one of privacy.noise_multiplier"),
    ({"privacy": {**DP, "clipping": "adaptive", "noise_multiplier": 1.0, "adaptive": {"count_noise": 0.1}}},
     "privacy.adaptive.count_noise (0.1) is too small for a noise multiplier of 1"),
])
def test_a_contradiction_is_one_error_naming_the_fields(tmp_path, settings, says):
    with pytest.raises(ConfigError, match=r".*" + says.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, **{"privacy": DP, **settings})


def test_a_run_past_its_budget_is_refused_before_it_trains(tmp_path):
    cfg = tiny_config(tmp_path, algorithm={"name": "fedavg"}, partition={"num_clients": 8},
                      federation={"clients_per_round": 4, "rounds": 50},
                      privacy={**DP, "noise_multiplier": 3.0, "budget_epsilon": 2.0})
    with pytest.raises(PrivacyBudgetExceeded, match=r"affords (\d+) rounds") as err:
        accountant(cfg, [("audio", "visual")] * 8)
    fits = int(re.search(r"affords (\d+) rounds", str(err.value)).group(1))  # type: ignore[union-attr]
    assert 0 < fits < 50
    assert library_epsilon(0.5, 3.0, fits) <= 2.0 < library_epsilon(0.5, 3.0, fits + 1)


def test_fedcmi_train_past_its_budget_is_one_line_and_writes_nothing(tiny, tmp_path):
    import yaml
    from faults import run_cli

    cfg = tiny()
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(cfg.to_dict()))
    r = run_cli(["train", "--set", "privacy.mechanism=central", "--set", "privacy.budget_epsilon=0.5",
                 "--set", "federation.rounds=30"], cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and "privacy.budget_epsilon 0.5 is exceeded" in r.stderr, r.stderr
    assert not (cfg.output.dir / "train").exists()


@pytest.mark.parametrize("clipping", ["fixed", "adaptive"])
def test_the_pipelines_steps_give_the_engines_dp_model_with_the_bound_carried_across_runs(tiny, tmp_path, clipping):
    from test_segments import _run_steps

    from fedcmi.io import load_state
    from fedcmi.runners.store import MODEL, finish

    torch.set_num_threads(1)
    cfg = tiny(algorithm={"name": "fedcmi"}, partition={"multimodal_fraction": 0.5},
               federation={"rounds": 3, "clients_per_round": 3}, privacy={**DP, "clipping": clipping})
    engine = train(cfg, tmp_path / "engine", progress=False)
    store = tmp_path / "store"
    _run_steps(cfg, store, tmp_path / "a", per_worker=2, rounds=range(1, 3))  # one run of two rounds
    _run_steps(cfg, store, tmp_path / "b", per_worker=1)  # the next run: the adapted bound comes from the store
    final = finish(cfg, store, tmp_path / "final.safetensors")
    state, _ = load_state(store / MODEL)
    assert all(torch.equal(state[k], engine.state[k]) for k in state)
    assert final is not None and final.mm_acc == engine.final.mm_acc


def test_a_model_without_a_shared_part_is_accounted_over_the_groups_it_has(tiny):
    from fedcmi.algorithms import build_model
    from fedcmi.data import DataModule
    from fedcmi.privacy.accounting import model_groups

    cfg = tiny(algorithm={"name": "ume"}, federation={"rounds": 20}, privacy={**DP, "noise_multiplier": 1.0})
    net = build_model(cfg, DataModule(cfg.data.prepared_dir).spec)
    groups = model_groups(cfg, net)
    assert groups == ("audio", "visual")  # UME's ensemble: two encoders with their heads, nothing shared
    acc = accountant(cfg, [("audio", "visual")] * 4, groups)
    # a multimodal client reaches two groups, not three: noise 1 / sqrt(2) at rate 2 of 4
    assert acc.client_epsilon(20) == pytest.approx(library_epsilon(0.5, 1 / math.sqrt(2), 20), rel=1e-12)
    assert acc.client_epsilon(20) < accountant(cfg, [("audio", "visual")] * 4).client_epsilon(20)
