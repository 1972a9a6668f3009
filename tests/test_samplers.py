"""Client samplers: uniform draws what the round's generator always drew; modality-aware guarantees each
modality its holders every round, deterministically, and leaves a round that already has them alone."""

from __future__ import annotations

import numpy as np
import pytest

from fedcmi.config import ConfigError, config_from_dict
from fedcmi.registry import SAMPLERS
from fedcmi.round.schedule import SAMPLING_STREAM, Schedule, sample_clients
from fedcmi.seeds import derive_seed


def _cfg(**federation):
    return config_from_dict({"seed": 4, "partition": {"num_clients": 20},
                             "federation": {"clients_per_round": 5, **federation}})


def test_uniform_is_the_draw_the_rounds_always_made():
    cfg = _cfg()
    for rnd in range(1, 30):
        rng = np.random.default_rng(derive_seed(cfg.seed, rnd - 1, SAMPLING_STREAM))
        assert sample_clients(cfg, rnd) == sorted(rng.choice(20, size=5, replace=False).tolist())
    assert sorted(SAMPLERS.names()) == ["modality_aware", "uniform"]


# 20 clients: 2 hold the rare modality alone, 2 hold both, 16 hold the common one alone
HOLDINGS = [("audio",)] * 16 + [("visual",)] * 2 + [("audio", "visual")] * 2


@pytest.mark.parametrize("quota", [1, 2])
def test_modality_aware_gives_each_modality_its_holders_every_round(quota):
    cfg = _cfg(sampler="modality_aware", modality_aware={"min_holders": quota})
    uniform = _cfg()
    short, kept = 0, 0
    for rnd in range(1, 201):
        drawn = sample_clients(cfg, rnd, HOLDINGS)
        assert len(set(drawn)) == 5 and drawn == sample_clients(cfg, rnd, HOLDINGS)  # distinct, deterministic
        for m in ("audio", "visual"):
            assert sum(m in HOLDINGS[c] for c in drawn) >= quota, (rnd, drawn)
        blind = sample_clients(uniform, rnd, HOLDINGS)
        if sum("visual" in HOLDINGS[c] for c in blind) >= quota:
            kept += 1
            assert drawn == blind  # a round that already met the quota is the uniform one
        else:
            short += 1
    assert short > 20 and kept > 20  # both kinds of round occurred: the test saw the swap and the no-op


def test_a_modality_held_by_fewer_clients_than_the_quota_gets_all_its_holders():
    cfg = _cfg(sampler="modality_aware", modality_aware={"min_holders": 2})
    held = [("audio",)] * 19 + [("visual",)]
    for rnd in range(1, 20):
        assert 19 in sample_clients(cfg, rnd, held)


def test_quotas_no_round_can_hold_are_one_error_naming_the_fields():
    with pytest.raises(ConfigError, match=r"federation.modality_aware.min_holders x 2 modalities \(6\) exceeds "
                                          r"federation.clients_per_round \(5\)"):
        _cfg(sampler="modality_aware", modality_aware={"min_holders": 3})
    with pytest.raises(ConfigError, match="unknown client sampler 'stratified'"):
        _cfg(sampler="stratified")
    with pytest.raises(ConfigError, match="min_holders"):
        _cfg(sampler="modality_aware", modality_aware={"min_holders": 0})


def test_every_executor_reads_the_holdings_from_the_partition_file(tiny):
    """The engine's schedule, the pipeline's steps and `fedcmi sample` read the partition file; the sample
    is the one the holdings give."""
    from fedcmi.partition import load_partition

    cfg = tiny(partition={"multimodal_fraction": 0.5}, federation={"clients_per_round": 2, "sampler": "modality_aware"})
    held = [c.modalities for c in load_partition(cfg.partition.file).clients]
    schedule = Schedule(cfg)
    for rnd in range(1, 6):
        assert schedule.clients(rnd) == sample_clients(cfg, rnd) == sample_clients(cfg, rnd, held)
        assert all(any(m in held[c] for c in schedule.clients(rnd)) for m in cfg.data.modalities)


def test_mlflow_gets_the_sampler_section_only_when_that_sampler_runs():
    assert not any(k.startswith("federation.modality_aware") for k in _cfg().applicable())
    chosen = _cfg(sampler="modality_aware", modality_aware={"min_holders": 2}).applicable()
    assert chosen["federation.modality_aware.min_holders"] == 2 and chosen["federation.sampler"] == "modality_aware"
