"""Partitioners: invariants, seeding, and refusals."""

from __future__ import annotations

import numpy as np
import pytest

from fedcmi.config import config_from_dict
from fedcmi.partition import (
    ClientShard,
    DirichletPartitioner,
    IidPartitioner,
    ModalityAssigner,
    Partition,
    PartitionError,
    load_partition,
    make_partition,
    save_partition,
)

LABELS = np.repeat(np.arange(6), 100)


def _check_exact_cover(shares, n):
    allidx = np.concatenate(shares)
    assert len(allidx) == n and len(np.unique(allidx)) == n


def test_iid_covers_every_sample_once():
    shares = IidPartitioner().split(LABELS, 7, np.random.default_rng(0))
    _check_exact_cover(shares, len(LABELS))
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


@pytest.mark.parametrize("alpha", [0.1, 1.0, 100.0])
def test_dirichlet_covers_every_sample_once_and_skews_labels(alpha):
    shares = DirichletPartitioner(alpha, None, min_samples=5).split(LABELS, 10, np.random.default_rng(1))
    _check_exact_cover(shares, len(LABELS))
    assert min(map(len, shares)) >= 5
    if alpha == 0.1:  # strong skew: some client misses a class entirely
        assert any((np.bincount(LABELS[s], minlength=6) == 0).any() for s in shares)


def test_dirichlet_cap_limits_growth():
    shares = DirichletPartitioner(0.3, 1.1, min_samples=1).split(LABELS, 10, np.random.default_rng(2))
    _check_exact_cover(shares, len(LABELS))
    # the cap closes a client once it passes 1.1 N / clients; one class can still overshoot it
    assert max(map(len, shares)) < 1.1 * len(LABELS) / 10 + 100


def test_dirichlet_refuses_impossible_minimum():
    with pytest.raises(PartitionError, match="min_samples"):
        DirichletPartitioner(1.0, None, min_samples=100).split(LABELS, 10, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="no Dirichlet"):
        DirichletPartitioner(0.01, None, min_samples=50, max_attempts=3).split(LABELS, 10, np.random.default_rng(0))


def test_modality_assignment_split():
    mods = ModalityAssigner(("a", "v"), 0.5).assign(10, np.random.default_rng(0))
    assert sum(len(m) == 2 for m in mods) == 5
    assert sum(m == ("a",) for m in mods) == sum(m == ("v",) for m in mods) == 2 or \
        abs(sum(m == ("a",) for m in mods) - sum(m == ("v",) for m in mods)) <= 1


def test_partition_refuses_lost_or_duplicated_samples():
    c0 = ClientShard(0, np.array([0, 1]), ("a", "v"), (1, 1))
    with pytest.raises(PartitionError, match="loses 1"):
        Partition((c0,), 3, 2, ("a", "v"), {})
    c1 = ClientShard(1, np.array([1, 2]), ("a",), (1, 1))
    with pytest.raises(PartitionError, match="duplicates 1"):
        Partition((c0, c1), 3, 2, ("a", "v"), {})


def test_make_partition_is_seeded_and_round_trips(tmp_path):
    cfg = config_from_dict({"partition": {"scheme": "dirichlet", "alpha": 0.5, "multimodal_fraction": 0.5}})
    a = make_partition(cfg, LABELS, ("audio", "visual"), 6)
    b = make_partition(cfg, LABELS, ("audio", "visual"), 6)
    assert a.to_json() == b.to_json()
    other = make_partition(cfg.model_copy(update={"seed": 1}), LABELS, ("audio", "visual"), 6)
    assert other.to_json() != a.to_json()
    save_partition(a, tmp_path / "p.json")
    assert load_partition(tmp_path / "p.json").to_json() == a.to_json()
    assert sum(c.multimodal for c in a.clients) == 5
    assert [sum(c.class_histogram) for c in a.clients] == [c.num_examples for c in a.clients]


def test_min_size_is_enforced_on_the_whole_partition():
    cfg = config_from_dict({"partition": {"num_clients": 10, "min_samples": 61, "scheme": "iid"}})
    with pytest.raises(PartitionError, match="fewer than 61"):
        make_partition(cfg, LABELS, ("audio", "visual"), 6)


# -- natural: the data's own groups as clients --------------------------------------------------------
GROUPS = np.array([1007, 1003, 1003, 1007, 1005, 1005, 1005, 1003, 1009, 1009])


def test_natural_gives_each_group_its_own_client_in_sorted_order():
    from fedcmi.partition import NaturalPartitioner

    shares = NaturalPartitioner(GROUPS, 1).split(np.zeros(10, dtype=np.int64), 4, np.random.default_rng(0))
    _check_exact_cover(shares, 10)
    assert [sorted(set(GROUPS[s].tolist())) for s in shares] == [[1003], [1005], [1007], [1009]]


def test_natural_with_fewer_clients_keeps_groups_whole_and_balances_by_samples():
    from fedcmi.partition import NaturalPartitioner

    shares = NaturalPartitioner(GROUPS, 1).split(np.zeros(10, dtype=np.int64), 2, np.random.default_rng(3))
    _check_exact_cover(shares, 10)
    held = [set(GROUPS[s].tolist()) for s in shares]
    assert not (held[0] & held[1])  # no group split between clients
    assert sorted(len(s) for s in shares) == [5, 5]  # 3 + 2 against 3 + 2
    again = NaturalPartitioner(GROUPS, 1).split(np.zeros(10, dtype=np.int64), 2, np.random.default_rng(3))
    assert all((a == b).all() for a, b in zip(shares, again, strict=True))


def test_natural_refuses_what_it_cannot_do_naming_the_setting():
    from fedcmi.partition import NaturalPartitioner

    y = np.zeros(10, dtype=np.int64)
    with pytest.raises(PartitionError, match="the training split holds 4 groups .* set partition.num_clients to 4"):
        NaturalPartitioner(GROUPS, 1).split(y, 5, np.random.default_rng(0))
    with pytest.raises(PartitionError, match=r"2 clients hold fewer than partition.min_samples=3 samples: client 2 "
                       r"\(group 1007: 2 samples\), client 3 \(group 1009: 2"):
        NaturalPartitioner(GROUPS, 3).split(y, 4, np.random.default_rng(0))
    with pytest.raises(PartitionError, match="needs a group id per training sample, and the prepared data has none"):
        NaturalPartitioner(None, 1)
