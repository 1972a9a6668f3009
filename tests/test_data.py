"""Data sources: the synthetic generator and bring-your-own npz."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from fedcmi.config import config_from_dict
from fedcmi.data import DataError, DataModule, prepare
from fedcmi.datasets.synthetic import (
    CLUTTER,
    SyntheticOptions,
    SyntheticSource,
    bayes_accuracy,
    draw_latent,
    num_groups,
)
from fedcmi.evaluation import ridge_probe_accuracy


def test_synthetic_is_seeded_and_shaped():
    cfg = SyntheticOptions(num_train=60, num_test=30, spectrogram=(8, 12), frames=3, frame_size=8)
    a = SyntheticSource(cfg, ("audio", "visual"), 1).generate()
    b = SyntheticSource(cfg, ("audio", "visual"), 1).generate()
    c = SyntheticSource(cfg, ("audio", "visual"), 2).generate()
    assert a["train"].features["audio"].shape == (60, 1, 8, 12)
    assert a["train"].features["visual"].shape == (60, 3, 3, 8, 8)
    assert np.array_equal(a["train"].features["visual"], b["train"].features["visual"])
    assert not np.array_equal(a["train"].features["audio"], c["train"].features["audio"])
    assert np.bincount(a["train"].labels).tolist() == [10] * 6


def test_synthetic_design_makes_the_multimodal_optimum_beat_either_modality():
    bayes = bayes_accuracy(SyntheticOptions(), n=40_000)
    assert bayes["multimodal"] > bayes["strong"] + 0.05 > bayes["weak"] + 0.1
    old = bayes_accuracy(SyntheticOptions(generator="templates", strong_snr=4.0, weak_snr=1.5), n=40_000)
    assert old["multimodal"] > old["strong"] + 0.05 > old["weak"] + 0.1


def test_latent_blind_spots_are_uncertainty_not_wrong_labels():
    cfg = SyntheticOptions(strong_blind=0.3)
    labels = np.arange(60_000) % cfg.num_classes
    lat = draw_latent(np.random.default_rng(0), labels, cfg)
    rows = np.arange(len(labels))
    blind = lat["blind"]
    assert abs(blind.mean() - 0.3) < 0.01
    partner_of = labels ^ 1
    # blind: the class and its partner get the same (zero-mean) weight; the pair still shows
    own, partner = lat["strong_class"][rows, labels], lat["strong_class"][rows, partner_of]
    assert abs(own[blind].mean()) < 0.03 and abs(partner[blind].mean()) < 0.03
    assert own[~blind].mean() > cfg.strong_snr * 0.9 and abs(partner[~blind].mean()) < 0.03
    assert lat["strong_group"][rows, labels // 2].mean() > cfg.strong_snr * 0.9
    # the intensity is one latent for both modalities: it scales the weak evidence too
    g = num_groups(cfg.num_classes)
    weak_own = lat["weak"][rows, labels // 2] * lat["polarity"]
    strong_intense = lat["intensity"] > 1.0
    assert weak_own[strong_intense].mean() > weak_own[~strong_intense].mean() + 0.5 * cfg.weak_snr * 0.4
    assert lat["weak"].shape[1] == g + 2 + CLUTTER


def test_latent_weak_modality_needs_a_nonlinear_encoder():
    cfg = SyntheticOptions(num_train=1200, num_test=300, num_val=0)
    splits = SyntheticSource(cfg, ("audio", "visual"), 0).generate()
    x = splits["train"].features["visual"].reshape(1200, -1).astype(np.float64)
    y = splits["train"].labels
    # every class's mean clip is (near) zero: the random polarity cancels it
    class_means = np.stack([x[y == c].mean(0) for c in range(cfg.num_classes)])
    assert np.abs(class_means).mean() < 0.15 * np.abs(x).mean()
    tx = splits["test"].features["visual"].reshape(300, -1).astype(np.float64)
    raw = ridge_probe_accuracy(x, y, tx, splits["test"].labels, cfg.num_classes, lam=100.0)
    assert raw < 0.3  # a linear read-out of the pixels is near chance (1/6)
    strong = splits["train"].features["audio"].reshape(1200, -1).astype(np.float64)
    ts = splits["test"].features["audio"].reshape(300, -1).astype(np.float64)
    assert ridge_probe_accuracy(strong, y, ts, splits["test"].labels, cfg.num_classes, lam=100.0) > 0.5


def test_templates_generator_reproduces_the_first_version_bit_for_bit():
    cfg = SyntheticOptions(generator="templates", strong_snr=4.0, weak_snr=1.5, num_train=60, num_test=30, num_val=12,
                          spectrogram=(8, 8), frames=1, frame_size=8)
    splits = SyntheticSource(cfg, ("audio", "visual"), 5).generate()
    h = hashlib.sha256()
    for name in sorted(splits):
        for m in sorted(splits[name].features):
            h.update(np.ascontiguousarray(splits[name].features[m]).tobytes())
        h.update(splits[name].labels.tobytes())
    # computed with the first version's generator (commit d5b5f5d)
    assert h.hexdigest() == "372a502eaf08253d958291e6906cd1e61ce56b5a79435a282097398085714540"


def test_strong_modality_is_configurable():
    cfg = SyntheticOptions(num_train=600, num_test=30, strong_modality="visual", spectrogram=(8, 8), frame_size=8)
    src = SyntheticSource(cfg, ("audio", "visual"), 0)
    assert src.strong == "visual" and src.weak == "audio"


def _write_npz(root, n=40, k=3, bad=None):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split in ("train", "test"):
        arrays = {"vec": rng.standard_normal((n, 10)).astype(np.float32),
                  "img": rng.standard_normal((n, 1, 6, 6)).astype(np.float32),
                  "label": (np.arange(n) % k).astype(np.int64)}
        if bad and split == "train":
            arrays = bad(arrays)
        np.savez(root / f"{split}.npz", **arrays)


def _npz_cfg(tmp_path):
    return config_from_dict({
        "data": {"name": "npz", "path": str(tmp_path / "raw"), "prepared_dir": str(tmp_path / "prep"),
                 "modalities": ["vec", "img"]},
        "model": {"encoders": {"vec": "mlp", "img": "cnn"}, "embed_dim": 8, "width": 4},
        "partition": {"num_clients": 2, "file": str(tmp_path / "p.json")},
        "federation": {"rounds": 1, "clients_per_round": 2},
        "output": {"dir": str(tmp_path / "out")},
    })


def test_npz_prepares_and_trains(tmp_path):
    from fedcmi.partition import make_partition, save_partition
    from fedcmi.runners.engine import train

    _write_npz(tmp_path / "raw")
    cfg = _npz_cfg(tmp_path)
    info = prepare(cfg)
    assert info["train"] == 40 and info["num_classes"] == 3
    dm = DataModule(cfg.data.prepared_dir)
    assert dm.spec.shapes == {"vec": (10,), "img": (1, 6, 6)}
    save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, 3), cfg.partition.file)
    assert 0 <= train(cfg, progress=False).final.mm_acc <= 1


def test_npz_group_ids_reach_the_prepared_data_and_a_natural_partition(tmp_path):
    """An npz 'group' array (a site per sample) is kept by prepare and makes the clients of scheme natural."""
    from fedcmi.config import config_from_dict as load
    from fedcmi.partition import make_partition

    _write_npz(tmp_path / "raw", bad=None)
    for split in ("train", "test"):
        with np.load(tmp_path / "raw" / f"{split}.npz") as z:
            arrays = dict(z)
        np.savez(tmp_path / "raw" / f"{split}.npz", **arrays, group=np.arange(40) // 10 + (0 if split == "train" else 7))
    cfg = load({**_npz_cfg(tmp_path).to_dict(), "partition": {"num_clients": 4, "scheme": "natural",
                                                              "file": str(tmp_path / "p.json")}})
    prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    assert dm.train.groups.tolist() == (np.arange(40) // 10).tolist() and dm.test.groups.min() == 7
    part = make_partition(cfg, dm.train.labels, dm.spec.modalities, 3, dm.train.groups)
    assert [c.indices.tolist() for c in part.clients] == [list(range(10 * g, 10 * g + 10)) for g in range(4)]
    # a group array in one file only is refused; so is one of the wrong length
    np.savez(tmp_path / "raw" / "test.npz", **{k: v for k, v in arrays.items() if k != "group"})
    with pytest.raises(DataError, match=r"\['train'\] hold a 'group' array and \['test'\] do not"):
        prepare(cfg)
    np.savez(tmp_path / "raw" / "test.npz", **{**arrays, "group": np.arange(3)})
    with pytest.raises(DataError, match="'group' must be a 1-D integer array with one id per sample"):
        prepare(cfg)


@pytest.mark.parametrize(
    "bad,needle",
    [
        (lambda a: {k: v for k, v in a.items() if k != "img"}, "lacks array(s) ['img']"),
        (lambda a: {**a, "label": a["label"].astype(np.float32)}, "'label' must be a 1-D integer"),
        (lambda a: {**a, "vec": np.full_like(a["vec"], np.nan)}, "NaN or Inf"),
        (lambda a: {**a, "img": a["img"][:, :, :4]}, "shape"),
    ],
)
def test_npz_errors_are_clear_and_nothing_is_written(tmp_path, bad, needle):
    _write_npz(tmp_path / "raw", bad=bad)
    cfg = _npz_cfg(tmp_path)
    with pytest.raises(DataError, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(").replace(")", r"\)")):
        prepare(cfg)
    assert not (tmp_path / "prep").exists()


def test_missing_npz_folder_names_the_layout(tmp_path):
    with pytest.raises(DataError, match="train.npz and .*test.npz"):
        prepare(_npz_cfg(tmp_path))


def test_failed_prepare_keeps_the_previous_prepared_data(tmp_path):
    _write_npz(tmp_path / "raw")
    cfg = _npz_cfg(tmp_path)
    prepare(cfg)
    before = (tmp_path / "prep" / "train" / "vec.npy").read_bytes()
    (tmp_path / "raw" / "test.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match="not a readable npz"):
        prepare(cfg)
    assert (tmp_path / "prep" / "train" / "vec.npy").read_bytes() == before
