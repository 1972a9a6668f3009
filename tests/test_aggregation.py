"""Aggregation: weighted means, per-modality renormalisation, untouched absent modalities."""

from __future__ import annotations

import pytest
import torch

from fedcmi.round.update import ClientUpdate, UpdateRejected, check_update
from fedcmi.rules.mean import Mean


def fedavg(global_state, updates):
    """Sample-weighted mean of every parameter: the mean rule with no modality groups."""
    return Mean(global_state).aggregate(updates)


def modality_aware_fedavg(global_state, updates, owner):
    """FedCMI's aggregation: the mean rule, a modality's parameters over the clients holding it."""
    return Mean(global_state, owner).aggregate(updates)


def owner(name: str):
    return name.split(".")[1] if name.startswith("encoders.") else None


GLOBAL = {"encoders.a.w": torch.zeros(2), "encoders.b.w": torch.full((2,), 9.0), "fusion.w": torch.zeros(1),
          "steps": torch.tensor(7)}


def upd(cid, val, n, mods):
    return ClientUpdate(cid, {"encoders.a.w": torch.full((2,), val), "encoders.b.w": torch.full((2,), val + 1),
                              "fusion.w": torch.full((1,), val), "steps": torch.tensor(1)}, n, mods)


def test_fedavg_is_the_sample_weighted_mean():
    out = fedavg(GLOBAL, [upd(0, 1.0, 1, ("a", "b")), upd(1, 4.0, 3, ("a", "b"))])
    assert out["encoders.a.w"].tolist() == pytest.approx([3.25, 3.25])  # (1*1 + 4*3) / 4
    assert out["fusion.w"].item() == pytest.approx(3.25)
    assert out["steps"].item() == 7  # integer buffers keep the global value


def test_modality_weights_are_renormalised_among_holders():
    ups = [upd(0, 1.0, 1, ("a", "b")), upd(1, 4.0, 3, ("a",)), upd(2, 10.0, 4, ("b",))]
    out = modality_aware_fedavg(GLOBAL, ups, owner)
    assert out["encoders.a.w"][0].item() == pytest.approx((1 * 1 + 4 * 3) / 4)  # clients 0, 1
    assert out["encoders.b.w"][0].item() == pytest.approx((2 * 1 + 11 * 4) / 5)  # clients 0, 2
    assert out["fusion.w"].item() == pytest.approx((1 * 1 + 4 * 3 + 10 * 4) / 8)  # everyone


def test_a_modality_absent_from_the_round_is_left_untouched():
    out = modality_aware_fedavg(GLOBAL, [upd(0, 1.0, 5, ("a",)), upd(1, 2.0, 5, ("a",))], owner)
    assert torch.equal(out["encoders.b.w"], GLOBAL["encoders.b.w"])
    assert out["encoders.a.w"][0].item() == pytest.approx(1.5)


def test_aggregation_is_exactly_reproducible():
    g = {"w": torch.randn(1000)}
    ups = [ClientUpdate(i, {"w": torch.randn(1000)}, 10 + i, ("a",)) for i in range(5)]
    assert torch.equal(fedavg(g, ups)["w"], fedavg(g, ups)["w"])


@pytest.mark.parametrize(
    "state,n,reason",
    [
        ({"encoders.a.w": torch.tensor([float("nan"), 0.0])}, 3, "NaN"),
        ({"encoders.a.w": torch.zeros(3)}, 3, "shape"),
        ({"encoders.x.w": torch.zeros(2)}, 3, "keys"),
        ({"encoders.a.w": torch.zeros(2)}, 0, "num_examples must be a positive integer"),
    ],
)
def test_bad_updates_are_rejected_with_the_reason(state, n, reason):
    with pytest.raises(UpdateRejected, match=reason):
        check_update({"encoders.a.w": torch.zeros(2)}, ClientUpdate(0, state, n, ("a",)))


def test_krum_picks_the_update_nearest_its_neighbours_and_ignores_an_outlier():
    from fedcmi.rules.krum import Krum, KrumOptions

    g = {"w": torch.zeros(3)}
    honest = [ClientUpdate(i, {"w": torch.full((3,), v)}, 1, ("a",)) for i, v in enumerate([1.0, 1.1, 0.9, 1.05])]
    liar = ClientUpdate(9, {"w": torch.full((3,), 1e6)}, 10**9, ("a",))
    rule = Krum(g, options=KrumOptions(byzantine=1))
    out = rule.aggregate([*honest, liar])
    # n=5, f=1: each scored over its n-f-2 = 2 nearest; 1.05 is 0.05 from both 1.0 and 1.1, the best score
    assert out["w"].tolist() == pytest.approx([1.05] * 3)
    assert rule.summary() == {"krum_short_groups": 0.0}  # 5 > 2f + 2


def test_krum_is_per_modality_group_and_reports_groups_short_of_its_guarantee():
    from fedcmi.rules.krum import Krum, KrumOptions

    ups = [upd(0, 1.0, 1, ("a", "b")), upd(1, 1.2, 1, ("a",)), upd(2, 50.0, 1, ("b",))]
    rule = Krum(GLOBAL, owner, KrumOptions(byzantine=1))
    out = rule.aggregate(ups)
    assert out["encoders.a.w"][0].item() in (1.0, pytest.approx(1.2))  # only clients 0 and 1 hold a
    assert out["encoders.b.w"][0].item() in (2.0, 51.0)  # only clients 0 and 2 hold b
    assert out["steps"].item() == 7
    assert rule.summary()["krum_short_groups"] == 3.0  # a, b and the shared group: n <= 2f + 2 everywhere


def test_multi_krum_averages_the_best_scored_and_tends_to_the_mean():
    from fedcmi.rules.multi_krum import MultiKrum, MultiKrumOptions

    g = {"w": torch.zeros(1)}
    vals = [1.0, 2.0, 3.0, 4.0, 100.0]
    ups = [ClientUpdate(i, {"w": torch.tensor([v])}, 1, ("a",)) for i, v in enumerate(vals)]
    out = MultiKrum(g, options=MultiKrumOptions(byzantine=1, select=3)).aggregate(ups)
    # scores over 2 neighbours: 2 and 3 score 2, 1 and 4 tie at 5 (the lower client id, 1, is kept)
    assert out["w"].item() == pytest.approx((2.0 + 3.0 + 1.0) / 3)
    everyone = MultiKrum(g, options=MultiKrumOptions(byzantine=0, select=5)).aggregate(ups)
    assert everyone["w"].item() == pytest.approx(sum(vals) / 5)


def test_a_round_record_reads_back_exactly_from_its_flat_line():
    from fedcmi.metrics import Evaluation
    from fedcmi.round.record import Participation, RoundRecord, Timing

    ev = Evaluation(mm_acc=0.5, uni_acc={"audio": 0.4, "visual": 0.3}, worst_class_acc=0.1, class_acc=[0.1, 0.9])
    rec = RoundRecord(3, Participation(sampled=[1, 2, 5], accepted=[1, 5], rejected={2: "client 2: NaN"},
                                       idle=[], clipped=1),
                      Timing(1.5, 2, 1), train={"loss": 0.7}, algorithm={"dominant_frac_audio": 0.25},
                      server={"krum_short_groups": 1.0}, evaluation=ev)
    line = rec.to_json()
    assert line["round"] == 3 and line["mm_acc"] == 0.5 and line["uni_acc_audio"] == 0.4
    assert RoundRecord.from_json(line) == rec
    assert RoundRecord.from_json(line).to_json() == line
