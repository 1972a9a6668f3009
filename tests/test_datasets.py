"""CREMA-D, AVE and CrisisMMD: tiny copies in their real layouts through prepare, partition and a round."""

from __future__ import annotations

import json

import layouts
import numpy as np
import pytest
import torch
from conftest import merge
from faults import ROOT, run_cli

from fedcmi.config import config_from_dict
from fedcmi.data import DataError, DataModule, prepare
from fedcmi.data.media import (
    audio_features,
    fit_length,
    log_spectrogram,
    natural_key,
    pick_evenly,
    read_wav,
    resample,
    spectrogram_shape,
)
from fedcmi.data.text import Vocabulary, WordVectors, clean, tokenize

# -- the pieces ----------------------------------------------------------------------------------------


def test_spectrogram_shapes_of_the_paper_settings():
    assert spectrogram_shape(16000, 3.0, 512, 353) == (1, 257, 299)  # CREMA-D
    assert spectrogram_shape(16000, 10.0, 512, 353) == (1, 257, 1004)  # AVE
    x = np.random.default_rng(0).standard_normal(48000).astype(np.float32)
    spec = log_spectrogram(x, 16000, 512, 353)
    assert spec.shape == (1, 257, 299) and spec.dtype == np.float32
    assert abs(float(spec.mean())) < 1e-4 and abs(float(spec.std()) - 1) < 1e-3  # standardised per clip


def test_short_clips_are_tiled_not_crashed_on():
    x = np.arange(5, dtype=np.float32)
    assert fit_length(x, 12).tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1]
    assert fit_length(x, 3).tolist() == [0, 1, 2]
    out = audio_features(np.ones(100, np.float32), 16000, 16000, 3.0, 512, 353)  # 6 ms of audio
    assert out.shape == (1, 257, 299) and np.isfinite(out).all()


def test_wav_reading_and_resampling(tmp_path):
    layouts.write_wav(tmp_path / "a.wav", 0.5, 1000, rate=16000, channels=2)
    x, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and x.shape == (8000,) and 0.35 < np.abs(x).max() < 0.45
    y = resample(x, 16000, 8000)
    assert y.shape == (4000,)
    spectrum = np.abs(np.fft.rfft(y))
    assert abs(np.argmax(spectrum) * 8000 / len(y) - 1000) < 5  # the tone stays at 1 kHz


def _wav(path, fmt_tag: int, bits: int, samples: np.ndarray, rate: int = 8000, extensible: bool = False) -> None:
    """A WAV file written byte by byte: PCM (1) or IEEE float (3), plain or WAVE_FORMAT_EXTENSIBLE."""
    import struct

    data = samples.tobytes()
    block = bits // 8
    if extensible:
        guid = struct.pack("<H", fmt_tag) + bytes.fromhex("000000001000800000aa00389b71")
        fmt = struct.pack("<HHIIHHHHI", 0xFFFE, 1, rate, rate * block, block, bits, 22, bits, 4) + guid
    else:
        fmt = struct.pack("<HHIIHH", fmt_tag, 1, rate, rate * block, block, bits)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(data)) + data
    path.write_bytes(b"RIFF" + struct.pack("<I", len(body)) + body)


@pytest.mark.parametrize("fmt_tag, bits, extensible", [(3, 32, False), (3, 32, True), (1, 16, True), (1, 24, True)])
def test_float_and_extensible_wav_files_are_read(tmp_path, fmt_tag, bits, extensible):
    tone = (0.5 * np.sin(np.arange(800) * 2 * np.pi * 440 / 8000)).astype(np.float32)
    if fmt_tag == 3:
        samples = tone
    elif bits == 16:
        samples = (tone * 32767).astype("<i2")
    else:  # 24-bit little-endian: the low three bytes of each int32
        samples = np.frombuffer((tone * (1 << 23)).astype("<i4").tobytes(), np.uint8).reshape(-1, 4)[:, :3].copy()
    _wav(tmp_path / "a.wav", fmt_tag, bits, samples, extensible=extensible)
    x, rate = read_wav(tmp_path / "a.wav")
    assert rate == 8000 and x.dtype == np.float32 and x.shape == (800,)
    assert np.abs(x - tone).max() < 1e-3


def test_frames_are_picked_evenly_from_the_naturally_sorted_list():
    assert sorted(["10.jpg", "2.jpg", "1.jpg"], key=natural_key) == ["1.jpg", "2.jpg", "10.jpg"]
    assert pick_evenly(10, 4) == [1, 3, 6, 8]
    assert pick_evenly(3, 1) == [1]
    assert pick_evenly(1, 3) == [0, 0, 0]
    assert pick_evenly(7, 7) == list(range(7))


def test_tweets_are_cleaned_and_the_vocabulary_is_deterministic():
    assert tokenize("RT @bob: Flood waters rising!! https://t.co/abc #Harvey") == ["flood", "waters", "rising",
                                                                                     "#harvey"]
    assert "http" not in clean("see http://x.y/z now")
    v = Vocabulary.build(["b a", "a c", "a b"], min_count=2, max_size=10)
    assert v.tokens == ["<pad>", "<unk>", "a", "b"]
    assert v.encode("a b zzz a a", 4).tolist() == [2, 3, 1, 2]
    assert v.encode("b", 3).tolist() == [3, 0, 0]


@pytest.mark.parametrize("header", [False, True])
def test_word_vectors_from_a_local_file(tmp_path, header):
    wv = WordVectors(layouts.glove(tmp_path / "v.txt", dim=6, header=header), {"flood", "water", "zebra"})
    assert wv.dim == 6 and set(wv.vectors) == {"flood", "water"}
    e = wv.embed("Flood and water")
    assert np.allclose(e, (wv.vectors["flood"] + wv.vectors["water"]) / 2)
    assert not wv.embed("nothing known").any()


# -- the datasets end to end --------------------------------------------------------------------------
def _cfg(tmp_path, data: dict, encoders: dict, modalities: list[str]) -> object:
    return config_from_dict(merge({
        "seed": 1,
        "data": {"prepared_dir": str(tmp_path / "prepared"), "modalities": modalities, "workers": 1,
                 "max_bad_fraction": 0.25},
        "partition": {"num_clients": 3, "min_samples": 2, "file": str(tmp_path / "partition.json"),
                      "scheme": "iid", "max_samples_per_client": None, "multimodal_fraction": 1.0},
        "model": {"encoders": encoders, "embed_dim": 8, "width": 4},
        "federation": {"rounds": 1, "clients_per_round": 2, "batch_size": 4, "local_epochs": 1},
        "algorithm": {"name": "fedcmi"},
        "evaluation": {"linear_probe": False},
        "tracking": {"enabled": False},
        "output": {"dir": str(tmp_path / "out")},
    }, {"data": data}))


def _partition_and_train(cfg) -> dict:
    from fedcmi.partition import make_partition, save_partition
    from fedcmi.runners.engine import train

    dm = DataModule(cfg.data.prepared_dir)
    save_partition(make_partition(cfg, dm.train.labels, dm.spec.modalities, dm.spec.num_classes), cfg.partition.file)
    res = train(cfg, progress=False)
    assert len(res.history) == 1 and 0 <= res.final.mm_acc <= 1
    assert all(torch.isfinite(v).all() for v in res.state.values() if v.is_floating_point())
    return res.final.flat()


CREMAD = {"sample_rate": 8000, "audio_seconds": 0.5, "nperseg": 64, "noverlap": 32, "frames": 2, "frame_size": 16}


@pytest.fixture(scope="module")
def cremad_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("CREMA-D")
    return root, layouts.cremad(root)


def test_cremad_prepares_from_its_layout_and_trains_a_round(cremad_root, tmp_path):
    root, planted = cremad_root
    cfg = _cfg(tmp_path, {"name": "cremad", "path": str(root), "cremad": CREMAD}, {"audio": "cnn", "visual": "clip"},
               ["audio", "visual"])
    info = prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    assert info["train"] == len(planted["train"]) - 1 and info["test"] == len(planted["test"])  # the broken wav
    assert dm.spec.shapes == {"audio": (1, 33, 124), "visual": (2, 3, 16, 16)}  # (4000 - 32) // 32 windows
    assert dm.spec.class_names == ("NEU", "HAP", "SAD", "FEA", "DIS", "ANG")
    assert dm.train.features["visual"].dtype == np.uint8
    report = dm.meta["report"]
    reasons = {s["key"]: s["reason"] for s in report["skipped_samples"]}
    assert set(reasons) == {planted["broken"], planted["unknown"]}
    assert "not a readable WAV file" in reasons[planted["broken"]] and "unknown label 'XXX'" in reasons[planted["unknown"]]
    # labels come from the list, in list order; the clip decoded from its video holds its class's colour
    kept = [c for c in planted["train"] if c != planted["broken"]]
    assert dm.train.labels.tolist() == [layouts.EMOTIONS.index(c.split("_")[2]) for c in kept]
    row = kept.index(planted["video_only"])
    red = dm.train.features["visual"][row, :, 0].mean(axis=(1, 2))
    assert np.allclose(red, layouts.class_color(2, 0)[0], atol=12)
    # frames are the evenly picked ones of the naturally sorted list (1, 2, 10 -> the 1st and the 3rd)
    row = kept.index("1001_IEO_NEU_XX")
    assert np.allclose(dm.train.features["visual"][row, :, 0].mean(axis=(1, 2)),
                       [layouts.class_color(0, 10)[0], layouts.class_color(0, 100)[0]], atol=12)
    x, _ = dm.train.batch(np.array([row]), ["visual"])
    assert x["visual"].dtype == torch.float32 and x["visual"].abs().max() < 3  # normalised per batch
    _partition_and_train(cfg)


def test_cremad_speaker_split_holds_out_whole_actors_and_is_seeded(cremad_root, tmp_path):
    root, _ = cremad_root
    data = {"name": "cremad", "path": str(root), "cremad": {**CREMAD, "split": "speakers", "test_speakers": 0.25,
                                                          "val_fraction": 0.34}}
    cfg = _cfg(tmp_path, data, {"audio": "cnn", "visual": "clip"}, ["audio", "visual"])
    from fedcmi.datasets.cremad import CremaDOptions, CremaDSource, clip_actor

    recs, _ = CremaDSource(root, cfg.data.options(CremaDOptions), cfg.seed).records()
    actors = {s: {clip_actor(r.key) for r in recs[s]} for s in recs}
    assert len(actors["test"]) == 1 and len(actors["val"]) == 1 and len(actors["train"]) == 2
    assert not (actors["test"] & actors["train"]) and not (actors["val"] & actors["train"])
    again, _ = CremaDSource(root, cfg.data.options(CremaDOptions), cfg.seed).records()
    assert again == recs
    info = prepare(cfg)
    assert info["val"] > 0


def _cli(cfg, command: str, folder) -> object:
    """``fedcmi COMMAND`` in a process, on ``cfg`` written out as a params file."""
    import yaml

    params = folder / f"{command}-params.yaml"
    params.write_text(yaml.safe_dump(cfg.to_dict()))
    return run_cli([command, "--params", str(params)], folder)


def test_cremad_actors_are_the_group_ids_and_a_natural_partition_makes_each_a_client(cremad_root, tmp_path):
    """Issue 25, part 3: prepare keeps every clip's actor as its group id (group.npy, stamped like every
    array); `fedcmi partition` with scheme natural gives each training actor one client, and a round trains."""
    from fedcmi.datasets.cremad import clip_actor
    from fedcmi.partition import load_partition

    root, planted = cremad_root
    data = {"name": "cremad", "path": str(root), "cremad": {**CREMAD, "split": "speakers", "test_speakers": 0.25}}
    cfg = _cfg(tmp_path, data, {"audio": "cnn", "visual": "clip"}, ["audio", "visual"])
    cfg = config_from_dict(merge(cfg.to_dict(), {"partition": {"scheme": "natural", "num_clients": 3}}))
    prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    assert dm.meta["groups"] is True and "train/group.npy" in dm.meta["stamps"]
    assert set(np.unique(dm.train.groups).tolist()) | set(np.unique(dm.test.groups).tolist()) == {1001, 1002, 1003,
                                                                                                    1004}
    assert not set(dm.train.groups.tolist()) & set(dm.test.groups.tolist())  # speaker-independent
    r = _cli(cfg, "partition", tmp_path)
    assert r.returncode == 0, r.stderr
    part = load_partition(cfg.partition.file)
    held = [sorted(set(dm.train.groups[c.indices].tolist())) for c in part.clients]
    assert sorted(held) == [[g] for g in sorted(set(dm.train.groups.tolist()))]
    r = _cli(cfg, "train", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    # a dataset without group ids: one clear line naming the setting
    plain = config_from_dict(merge(cfg.to_dict(), {"data": {"name": "synthetic", "prepared_dir": str(tmp_path / "p2")},
                                                   "partition": {"file": str(tmp_path / "p2.json")}}))
    prepare(plain)
    r = _cli(plain, "partition", tmp_path)
    assert r.returncode != 0 and "partition.scheme: natural needs a group id per training sample" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert {clip_actor(c) for c in planted["clips"]} == {"1001", "1002", "1003", "1004"}


def test_the_fedmultimodal_preset_trains_on_the_cremad_layout_and_its_card_says_so(cremad_root, tmp_path):
    """Issue 25, part 3: `protocol: fedmultimodal-cremad` in one line: the raters' vote among four classes,
    speaker folds, one client per training actor, UAR as the headline; the run's data card states them."""
    root, planted = cremad_root
    cfg = _cfg(tmp_path, {"name": "cremad", "path": str(root), "cremad": {**CREMAD, "folds": 4}},
               {"audio": "cnn", "visual": "clip"}, ["audio", "visual"])
    cfg = config_from_dict(merge(cfg.to_dict(), {"protocol": "fedmultimodal-cremad",
                                                 "partition": {"num_clients": 3, "scheme": "natural"},
                                                 "evaluation": {"every": 1}}))
    assert (cfg.partition.scheme, cfg.tracking.headline_metric) == ("natural", "mm_uar")
    info = prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    assert dm.spec.class_names == ("ANG", "SAD", "HAP", "NEU")
    assert set(dm.test.groups.tolist()) == {1001} and set(dm.train.groups.tolist()) == {1002, 1003, 1004}
    # fear and the tied disgust votes are left out by the class set, not counted as unreadable
    assert dm.meta["source"]["excluded_by_class_set"] == 8 and info["skipped"] == 1  # the broken wav
    kept = {v for v in planted["votes"].values() if v in "ASHN"}
    assert set(dm.train.labels.tolist()) | set(dm.test.labels.tolist()) <= set(range(len(kept)))
    assert (dm.train.labels == 3).sum() == 4  # three actors' neutral clips and 1003's happy one, voted neutral
    assert _cli(cfg, "partition", tmp_path).returncode == 0
    r = _cli(cfg, "train", tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    card = json.loads((cfg.output.dir / "train" / "card.json").read_text())
    assert card == {"protocol": "fedmultimodal-cremad", "dataset": "cremad", "classes": "ANG,SAD,HAP,NEU",
                    "split": "speaker fold 1 of 4", "clients": "natural (whole groups), 3 clients",
                    "metric": "mm_uar"}
    metrics = json.loads((cfg.output.dir / "train" / "metrics.json").read_text())
    assert {"mm_uar", "mm_f1", "mm_acc"} <= set(metrics)


def test_prepare_on_the_command_line_names_every_skipped_file(cremad_root, tmp_path):
    root, planted = cremad_root
    settings = {"data.name": "cremad", "data.path": root, "data.max_bad_fraction": 0.25,
                "data.prepared_dir": tmp_path / "prepared",
                **{f"data.cremad.{k}": v for k, v in CREMAD.items()}}
    r = run_cli(["prepare", "--params", str(ROOT / "params.yaml"), "--no-progress",
                 *[a for k, v in settings.items() for a in ("--set", f"{k}={v}")]], tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["skipped"] == 2
    assert "skipped 2 sample(s)" in r.stderr and str(tmp_path / "prepared" / "meta.json") in r.stderr
    assert f"train: {planted['broken']}: " in r.stderr and f"{planted['unknown']}: unknown label 'XXX'" in r.stderr


def test_cremad_prepares_in_worker_processes_with_the_same_result(cremad_root, tmp_path):
    root, _ = cremad_root
    one = _cfg(tmp_path / "one", {"name": "cremad", "path": str(root), "cremad": CREMAD},
               {"audio": "cnn", "visual": "clip"}, ["audio", "visual"])
    two = one.model_copy(update={"data": one.data.model_copy(update={"workers": 2,
                                                                     "prepared_dir": tmp_path / "two"})})
    prepare(one)
    prepare(two)
    for split in ("train", "test"):
        for name in ("audio", "visual", "label"):
            a = np.load(one.data.prepared_dir / split / f"{name}.npy")
            b = np.load(two.data.prepared_dir / split / f"{name}.npy")
            assert np.array_equal(a, b)


def test_ave_prepares_event_segments_and_trains_a_round(tmp_path):
    pytest.importorskip("av")
    root = tmp_path / "AVE_Dataset"
    layouts.ave(root)
    data = {"name": "ave", "path": str(root),
            "ave": {"sample_rate": 8000, "audio_seconds": 1.0, "nperseg": 64, "noverlap": 32, "frames": 2,
                    "frame_size": 16}}
    cfg = _cfg(tmp_path, data, {"audio": "cnn", "visual": "clip"}, ["audio", "visual"])
    info = prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    assert (info["train"], info["val"], info["test"]) == (6, 1, 2)
    assert dm.spec.class_names == tuple(sorted(layouts.AVE_CATEGORIES))
    assert [s["reason"] for s in dm.meta["report"]["skipped_samples"]] == [
        "unknown label 'Helicopter': not a category of trainSet.txt"]
    # frames come from inside the segment: v001 (Bark, seconds 1-3) never shows its second-0 colour
    k = layouts.AVE_CATEGORIES.index("Bark")
    row = 1
    reds = dm.train.features["visual"][row, :, 0].mean(axis=(1, 2))
    assert np.allclose(reds, [layouts.class_color(k, 10)[0], layouts.class_color(k, 20)[0]], atol=12)
    assert dm.train.labels[row] == dm.spec.class_names.index("Bark")
    _partition_and_train(cfg)


@pytest.mark.parametrize("text", ["vocab", "vectors"])
def test_crisismmd_prepares_image_and_text_and_trains_a_round(tmp_path, text):
    root = tmp_path / "CrisisMMD_v2.0"
    layouts.crisismmd(root)
    crisis = {"image_size": 16, "max_tokens": 8, "min_token_count": 1, "text": text}
    if text == "vectors":
        crisis["text_model"] = str(layouts.glove(tmp_path / "glove.txt", dim=6))
    cfg = _cfg(tmp_path, {"name": "crisismmd", "path": str(root), "crisismmd": crisis},
               {"image": "cnn", "text": "text" if text == "vocab" else "mlp"}, ["image", "text"])
    info = prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    assert (info["train"], info["val"], info["test"]) == (15, 4, 6)
    reasons = [s["reason"] for s in dm.meta["report"]["skipped_samples"]]
    assert any("missing" in r for r in reasons) and any("unknown label 'nonsense_label'" in r for r in reasons)
    assert dm.spec.class_names == ("informative", "not_informative")
    if text == "vocab":
        vocab = json.loads((cfg.data.prepared_dir / "vocabulary_text.json").read_text())
        assert dm.spec.vocab_sizes["text"] == len(vocab) and "flood" in vocab and "https" not in vocab
        assert dm.train.features["text"].dtype == np.int64 and dm.spec.shapes["text"] == (8,)
    else:
        assert dm.spec.shapes["text"] == (6,) and dm.train.features["text"].dtype == np.float32
    _partition_and_train(cfg)


def test_crisismmd_humanitarian_merge_folds_two_classes(tmp_path):
    root = tmp_path / "CrisisMMD_v2.0"
    layouts.crisismmd(root, task="humanitarian")
    crisis = {"task": "humanitarian", "merge_humanitarian": True, "image_size": 8, "max_tokens": 4}
    cfg = _cfg(tmp_path, {"name": "crisismmd", "path": str(root), "crisismmd": crisis},
               {"image": "cnn", "text": "text"}, ["image", "text"])
    prepare(cfg)
    dm = DataModule(cfg.data.prepared_dir)
    assert len(dm.spec.class_names) == 6 and "injured_or_dead_people" not in dm.spec.class_names
    affected = dm.spec.class_names.index("affected_individuals")
    assert (dm.train.labels == affected).sum() == 8  # affected_individuals and injured_or_dead_people rows


# -- errors ------------------------------------------------------------------------------------------------------
def test_a_missing_root_or_split_file_names_the_expected_layout(tmp_path, cremad_root):
    cfg = _cfg(tmp_path, {"name": "cremad", "path": str(tmp_path / "nope"), "cremad": CREMAD},
               {"audio": "cnn", "visual": "clip"}, ["audio", "visual"])
    with pytest.raises(DataError, match=r"(?s)CREMA-D root folder not found.*AudioWAV/<clip>.wav"):
        prepare(cfg)
    cfg = _cfg(tmp_path, {"name": "ave", "path": str(cremad_root[0])}, {"audio": "cnn", "visual": "clip"},
               ["audio", "visual"])
    with pytest.raises(DataError, match=r"(?s)AVE annotation list not found.*trainSet.txt.*Category&VideoID"):
        prepare(cfg)
    cfg = _cfg(tmp_path, {"name": "crisismmd", "path": str(tmp_path)}, {"image": "cnn", "text": "text"},
               ["image", "text"])
    with pytest.raises(DataError, match="task_informative_text_img_train.tsv"):
        prepare(cfg)
    assert not (tmp_path / "prepared").exists()


def test_too_many_unreadable_files_stop_the_run_and_keep_the_previous_data(cremad_root, tmp_path):
    root, planted = cremad_root
    ok = _cfg(tmp_path, {"name": "cremad", "path": str(root), "cremad": CREMAD}, {"audio": "cnn", "visual": "clip"},
              ["audio", "visual"])
    prepare(ok)
    before = (ok.data.prepared_dir / "train" / "audio.npy").read_bytes()
    # 25 samples, 1 may be bad: the unknown label is, and decoding stops at the broken wav, the second
    strict = ok.model_copy(update={"data": ok.data.model_copy(update={"max_bad_fraction": 0.05})})
    with pytest.raises(DataError, match=r"2 of 25 samples could not be used.*max_bad_fraction \(0.05\).*"
                                        r"unknown label 'XXX'.*1001_IEO_ANG_XX: .*not a readable WAV"):
        prepare(strict)
    assert (ok.data.prepared_dir / "train" / "audio.npy").read_bytes() == before


def test_dataset_modalities_and_encoders_are_checked(tmp_path):
    from fedcmi.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.modalities must be \['image', 'text'\]"):
        config_from_dict({"data": {"name": "crisismmd"}})
    with pytest.raises(ConfigError, match="noverlap"):
        config_from_dict({"data": {"cremad": {"nperseg": 64, "noverlap": 64}}})
