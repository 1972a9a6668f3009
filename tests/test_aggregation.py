"""Aggregation: weighted means, per-modality renormalisation, untouched absent modalities."""

from __future__ import annotations

import pytest
import torch

from fedcmi.algorithms.aggregation import ClientUpdate, UpdateRejected, check_update, fedavg, modality_aware_fedavg


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
