"""Data faults as FedMultimodal simulates them: seeded, kept in the partition file, applied to the batches."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from fedcmi.data import DataModule
from fedcmi.data.faults import missing_at_test
from fedcmi.federation import Federation
from fedcmi.partition import PartitionError, load_partition, make_partition, save_partition
from fedcmi.runners.engine import train

RATES = {"missing_modality": 0.5, "label_noise": 0.25, "missing_labels": 0.3}


def _faulty(tiny, **rates):
    return tiny(partition={"multimodal_fraction": 0.5, "faults": rates})


def test_faults_are_seeded_counted_and_recorded_in_the_partition_stats(tiny):
    cfg = _faulty(tiny, **RATES)
    part = load_partition(cfg.partition.file)
    dm = DataModule(cfg.data.prepared_dir)
    again = make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes)
    assert json.dumps(again.to_json(), sort_keys=True) == json.dumps(part.to_json(), sort_keys=True)  # same seed, same faults
    stats = part.stats()
    for c, row in zip(part.clients, stats["per_client"], strict=True):
        n = len(c.indices)
        counts = row["faults"]
        assert counts["missing_modality"] == (round(0.5 * n) if c.multimodal else 0)
        assert counts["noisy_labels"] == round(0.25 * n) and counts["unlabeled"] == round(0.3 * n)
        assert row["num_examples"] == n - counts["unlabeled"] == c.num_examples
        labels = dm.train.labels
        assert all(labels[i] != lab for i, lab in c.faults.noisy)  # a noisy label is always another class
    assert stats["faults"]["noisy_labels"] == sum(r["faults"]["noisy_labels"] for r in stats["per_client"])


def test_no_faults_leave_the_partition_as_it_was(tiny):
    clean = tiny(partition={"multimodal_fraction": 0.5})
    raw = json.loads(clean.partition.file.read_text())
    assert all("faults" not in c for c in raw["clients"])
    faulty = _faulty(tiny, **RATES)
    shares = [c["indices"] for c in json.loads(faulty.partition.file.read_text())["clients"]]
    assert shares == [c["indices"] for c in raw["clients"]]  # faults never move a sample to another client


def test_batches_carry_the_faults_and_unlabelled_samples_are_not_trained_on(tiny):
    cfg = _faulty(tiny, **RATES)
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    shard = next(c for c in fed.partition.clients if c.multimodal)
    ctx = fed.client_context(shard.id, 1)
    assert ctx is not None and ctx.num_examples == len(shard.indices) - len(shard.faults.unlabeled)
    labels = fed.data.train.labels
    noisy = dict(shard.faults.noisy.tolist())
    gone = {m: set(v.tolist()) for m, v in shard.faults.missing.items()}
    # one pass in order: rebuild the batches with their indices from the same loader inputs
    order = shard.labelled
    x, y = fed.data.train.batch(order, fed.data.spec.modalities)
    x, y = fed.faults.apply(order, x, y)
    seen = 0
    for i, idx in enumerate(order.tolist()):
        assert int(y[i]) == noisy.get(idx, int(labels[idx]))
        for m in fed.data.spec.modalities:
            zero = bool((x[m][i] == 0).all())
            assert zero == (idx in gone[m]), (idx, m)
        seen += 1
    assert seen == ctx.num_examples and not set(order.tolist()) & set(shard.faults.unlabeled.tolist())
    total = sum(len(b[1]) for b in ctx.batches(0))
    assert total == ctx.num_examples


def test_test_time_missing_modality_is_seeded_and_lowers_nothing_it_should_not(tiny):
    cfg = tiny(partition={"multimodal_fraction": 0.5})
    f = missing_at_test(60, ("audio", "visual"), 0.5, seed=3, split="test")
    g = missing_at_test(60, ("audio", "visual"), 0.5, seed=3, split="test")
    assert f is not None and g is not None
    assert all(np.array_equal(f.missing[m], g.missing[m]) for m in f.missing)
    assert sum(int(v.sum()) for v in f.missing.values()) == 30
    assert not (f.missing["audio"] & f.missing["visual"]).any()  # a sample keeps one modality
    assert missing_at_test(60, ("audio", "visual"), 0.0, seed=3, split="test") is None
    from fedcmi.evaluation import _collect

    res = train(cfg, cfg.output.dir / "a", progress=False)
    fed = Federation(cfg, DataModule(cfg.data.prepared_dir), load_partition(cfg.partition.file))
    fed.load(res.state)
    everything = missing_at_test(60, fed.data.spec.modalities, 1.0, seed=cfg.seed, split="test")
    clean, y = _collect(fed.model, fed.data.split_batches("test", 32), fed.device)
    broken, y2 = _collect(fed.model, fed.data.split_batches("test", 32, faults=everything), fed.device)
    assert np.array_equal(y, y2) and not np.array_equal(clean["mm"], broken["mm"])
    assert everything is not None
    for m in fed.data.spec.modalities:  # the modality that stays is read as it is
        kept = ~everything.missing[m]
        assert kept.any() and np.array_equal(clean[f"uni/{m}"][kept], broken[f"uni/{m}"][kept])
    half = cfg.model_copy(update={"evaluation": cfg.evaluation.model_copy(update={"missing_modality": 0.5})})
    ev = Federation(half, fed.data, fed.partition).evaluate(res.state)
    assert 0.0 <= ev.mm_acc <= 1.0


@pytest.mark.parametrize("damage, says", [
    (lambda c, o: c.update(faults={"unlabeled": [o["indices"][0], o["indices"][0]]}), "distinct samples"),
    (lambda c, o: c.update(faults={"unlabeled": [10**6]}), "client's own"),
    (lambda c, o: c.update(faults={"noisy_labels": [[c["indices"][0], 99]]}), "noisy_labels"),
    (lambda c, o: c.update(faults={"missing": {"smell": [c["indices"][0]]}}), "missing must map"),
    (lambda c, o: c.update(faults={"unlabeled": list(c["indices"])}), "every sample is unlabelled"),
    (lambda c, o: c.update(faults={"dropped": []}), "must hold only"),
])
def test_a_damaged_faults_entry_is_one_clear_partition_error(tiny, damage, says):
    cfg = tiny(partition={"multimodal_fraction": 1.0})
    raw = json.loads(cfg.partition.file.read_text())
    client, other = raw["clients"][0], raw["clients"][1]
    damage(client, other)
    cfg.partition.file.write_text(json.dumps(raw))
    with pytest.raises(PartitionError, match=says):
        load_partition(cfg.partition.file)


def test_a_faulty_federation_trains_and_its_faults_move_the_model(tiny):
    clean = tiny(partition={"multimodal_fraction": 0.5})
    a = train(clean, clean.output.dir / "clean", progress=False)
    faulty = _faulty(tiny, **RATES)  # the same project, partitioned again with faults
    b = train(faulty, faulty.output.dir / "faulty", progress=False)
    assert any(not torch.equal(a.state[k], b.state[k]) for k in a.state)
    save_partition(load_partition(faulty.partition.file), faulty.partition.file)  # reads back and writes the same
