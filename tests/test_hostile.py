"""Hostile or broken client updates at the aggregation step (the files a Kubeflow round concludes from).

Each case is a file a lying or broken client could send; each must be refused with a reason that names
the client, and the global model must be exactly the one the honest updates alone give.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import merge
from safetensors.torch import save as save_bytes

from fedcmi.config import config_from_dict
from fedcmi.io import FORMAT, _assemble, _digest, _split, load_state, save_state
from fedcmi.partition import load_partition
from fedcmi.registry import RULES
from fedcmi.round.clipping import clip_change
from fedcmi.round.server import RoundFailed
from fedcmi.round.update import ClientUpdate, change_norm
from fedcmi.rules.mean import Mean
from fedcmi.rules.trimmed_mean import TrimmedMeanOptions
from fedcmi.runners.files import aggregate_step, client_train_step, init_step, sample_step

ROUNDS = {"rounds": 1, "clients_per_round": 3, "batch_size": 16, "min_clients": 1}


def forge(path: Path, state: dict[str, torch.Tensor], meta_text: str) -> Path:
    """A file with a valid checksum over whatever metadata text a client chose to send."""
    header, data = _split(save_bytes(state, metadata={"format": FORMAT, "meta": meta_text}), path)
    header["__metadata__"]["sha256"] = _digest(header, data)
    path.write_bytes(_assemble(header, data))
    return path


@pytest.fixture
def round_files(tiny, tmp_path):
    """A round's honest update files, and the model the honest files alone give."""
    cfg = tiny(federation=ROUNDS)
    g = init_step(cfg, tmp_path / "g0.safetensors")
    clients = sample_step(cfg, 1)
    honest = [client_train_step(cfg, g, cid, 1, tmp_path / f"u{cid}.safetensors") for cid in clients]
    expected, _ = aggregate_step(cfg, g, honest, 1, tmp_path / "expected.safetensors")
    return cfg, g, clients, honest, load_state(expected)[0]


def lie(path: Path, out: Path, change_state=None, **meta_changes) -> Path:
    state, meta = load_state(path)
    if change_state is not None:
        state = change_state(state)
    return save_state(out, state, {**meta, **meta_changes})


def summary_of(rec) -> dict:
    """A round record's participation, with ``clipped``, as a dict by client id."""
    p = rec.participation
    return {"accepted": p.accepted, "rejected": p.rejected, "idle": p.idle, "clipped": p.clipped}


def conclude(cfg, g, files, tmp_path) -> tuple[dict[str, torch.Tensor], dict]:
    out, rec = aggregate_step(cfg, g, files, 1, tmp_path / "g1.safetensors")
    return load_state(out)[0], summary_of(rec)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _scaled(factor: float):
    return lambda s: {k: v * factor if v.is_floating_point() else v for k, v in s.items()}


def _as(dtype: torch.dtype):
    return lambda s: {k: v.to(dtype) if v.is_floating_point() else v for k, v in s.items()}


def _huge(s):
    return {k: torch.full_like(v, 3e38) if v.is_floating_point() else v for k, v in s.items()}


def _transposed(s):
    key = next(k for k, v in s.items() if v.dim() == 2 and v.shape[0] != v.shape[1])
    return {**s, key: s[key].t().contiguous()}


LIES = {
    "claims 1e12 samples": (None, {"num_examples": 10**12}, "claims 1000000000000 samples; its shard holds"),
    "float num_examples": (None, {"num_examples": 12.5}, "num_examples must be a positive integer"),
    "NaN num_examples": (None, {"num_examples": math.nan}, "num_examples must be a positive integer"),
    "string num_examples": (None, {"num_examples": "40"}, "num_examples must be a positive integer"),
    "bool num_examples": (None, {"num_examples": True}, "num_examples must be a positive integer"),
    "zero samples": (None, {"num_examples": 0}, "num_examples must be a positive integer"),
    "int32 tensors": (_as(torch.int32), {}, "has dtype torch.int32, expected torch.float32"),
    "bool tensors": (_as(torch.bool), {}, "has dtype torch.bool, expected torch.float32"),
    "float64 tensors": (_as(torch.float64), {}, "has dtype torch.float64"),
    "finite 3e38 values": (_huge, {}, "above the bound"),
    "a change 1000 times too large": (_scaled(1000.0), {}, "above the bound"),
    "a transposed tensor": (_transposed, {}, "has shape"),
    "a round other than this one": (None, {"round": 6}, "the file is from round 6, this is round 1"),
    "no round": (None, {"round": None}, "the file is from round None"),
    "empty modalities": (None, {"modalities": []}, "modalities must be a non-empty list"),
    "bogus modalities": (None, {"modalities": ["smell"]}, "claims modalities ['smell']"),
    "fewer modalities than it holds": (None, {"modalities": ["audio"]}, "claims modalities ['audio']"),
    "metrics as a list": (None, {"metrics": [1, 2]}, "metrics must be a mapping"),
    "an unknown kind": (None, {"kind": "global"}, "is not a client update"),
    "a client id that is not a number": (None, {"client_id": "0"}, "names no client"),
}


@pytest.mark.parametrize("case", list(LIES))
def test_a_lying_update_is_refused_and_the_model_is_the_honest_ones(round_files, tmp_path, case):
    cfg, g, clients, honest, _ = round_files
    change, meta, reason = LIES[case]
    liar = clients[0]
    bad = lie(honest[0], tmp_path / "bad.safetensors", change, **meta)
    state, summary = conclude(cfg, g, [bad, *honest[1:]], tmp_path)
    shown = liar if not isinstance(meta.get("client_id"), str) else -1
    assert reason in summary["rejected"][shown], summary["rejected"]
    assert summary["accepted"] == clients[1:]
    only_honest, _ = conclude(cfg, g, honest[1:], tmp_path)
    assert_same(state, only_honest)


def test_the_same_update_sent_three_times_counts_once(round_files, tmp_path):
    cfg, g, clients, honest, expected = round_files
    state, summary = conclude(cfg, g, [honest[0], honest[0], honest[0], *honest[1:]], tmp_path)
    assert summary["accepted"] == clients
    assert "sent more than one update in round 1" in summary["rejected"][clients[0]]
    assert_same(state, expected)


def test_an_update_from_a_client_that_was_not_sampled_is_refused(round_files, tmp_path):
    cfg, g, clients, honest, expected = round_files
    outsider = next(c for c in range(cfg.partition.num_clients) if c not in clients)
    forged = lie(honest[0], tmp_path / "outsider.safetensors", client_id=outsider)
    state, summary = conclude(cfg, g, [*honest, forged], tmp_path)
    assert f"client {outsider} was not sampled in round 1" in summary["rejected"][outsider]
    assert_same(state, expected)


@pytest.mark.parametrize("meta_text", ["not json {", "[1, 2, 3]", '"a string"'])
def test_metadata_that_is_not_a_json_object_is_refused(round_files, tmp_path, meta_text):
    cfg, g, clients, honest, _ = round_files
    state, _ = load_state(honest[0])
    bad = forge(tmp_path / "bad.safetensors", state, meta_text)
    _, summary = conclude(cfg, g, [bad, *honest[1:]], tmp_path)
    assert "metadata is not" in summary["rejected"][-1]
    assert summary["accepted"] == clients[1:]


def test_missing_metadata_keys_are_refused(round_files, tmp_path):
    cfg, g, clients, honest, _ = round_files
    state, meta = load_state(honest[0])
    bad = forge(tmp_path / "bad.safetensors", state, json.dumps({"kind": "update", "client_id": clients[0]}))
    _, summary = conclude(cfg, g, [bad, *honest[1:]], tmp_path)
    assert "the file is from round None" in summary["rejected"][clients[0]]


def test_a_round_of_skipped_markers_from_clients_that_train_fails(round_files, tmp_path):
    """'Nothing to train' is checked against the partition: every client here holds both modalities."""
    cfg, g, clients, honest, _ = round_files
    skipped = [save_state(tmp_path / f"s{cid}.safetensors", {}, {"kind": "skipped", "round": 1, "client_id": cid})
               for cid in clients]
    with pytest.raises(RoundFailed, match="reported nothing to train, but it holds audio\\+visual"):
        conclude(cfg, g, skipped, tmp_path)


def test_a_skipped_marker_is_honoured_where_the_algorithm_gives_the_client_nothing(tiny, tmp_path):
    cfg = tiny(federation=ROUNDS, algorithm={"name": "unimodal", "modality": "visual"},
               partition={"multimodal_fraction": 0.0})
    part = load_partition(cfg.partition.file)
    g = init_step(cfg, tmp_path / "g0.safetensors")
    files = [client_train_step(cfg, g, cid, 1, tmp_path / f"u{cid}.safetensors") or tmp_path / f"u{cid}.safetensors"
             for cid in sample_step(cfg, 1)]
    _, rec = aggregate_step(cfg, g, files, 1, tmp_path / "g1.safetensors")
    summary = summary_of(rec)
    audio_only = [c for c in sample_step(cfg, 1) if part.client(c).modalities == ("audio",)]
    assert summary["idle"] == audio_only and not summary["rejected"]


def test_a_damaged_update_file_is_refused_by_its_checksum(round_files, tmp_path):
    cfg, g, clients, honest, _ = round_files
    raw = bytearray(honest[0].read_bytes())
    raw[raw.index(b"F32")] = ord("I")  # F32 -> I32 in the header: still parses, other numbers
    (tmp_path / "flipped.safetensors").write_bytes(raw)
    _, summary = conclude(cfg, g, [tmp_path / "flipped.safetensors", *honest[1:]], tmp_path)
    assert "does not match its checksum" in summary["rejected"][clients[0]]


# -- the server's rules on tiny tensors -------------------------------------------------------------------------
def _update(cid: int, value: float, n: int = 1, mods: tuple[str, ...] = ("a", "b")) -> ClientUpdate:
    return ClientUpdate(cid, {"a.w": torch.tensor([value]), "b.w": torch.tensor([-value])}, n, mods)


GLOBAL = {"a.w": torch.tensor([0.0]), "b.w": torch.tensor([0.0])}


def _rule(rule: str, values: list[float], trim: float = 0.25, owner=None, mods=None) -> dict[str, torch.Tensor]:
    acc = RULES.get(rule)(GLOBAL, owner, TrimmedMeanOptions(trim_fraction=trim))
    for i, v in enumerate(values):
        acc.add(_update(i, v, n=1000 if v >= 100 else 1, mods=(mods or {}).get(i, ("a", "b"))))
    return acc.result()


def test_the_median_ignores_one_liar_and_its_sample_count():
    assert float(_rule("median", [1.0, 2.0, 100.0])["a.w"]) == 2.0
    assert float(_rule("median", [1.0, 2.0, 3.0, 100.0])["a.w"]) == 2.5  # even: the two middle values' mean
    mean = Mean(GLOBAL)
    for i, v in enumerate([1.0, 2.0, 100.0]):
        mean.add(_update(i, v, n=1000 if v >= 100 else 1))
    assert float(mean.result()["a.w"]) > 99  # the weighted mean is the liar's


def test_the_trimmed_mean_drops_each_end():
    assert float(_rule("trimmed_mean", [1.0, 2.0, 3.0, 100.0], trim=0.25)["a.w"]) == 2.5
    assert float(_rule("trimmed_mean", [1.0, 2.0, 3.0, 100.0], trim=0.0)["a.w"]) == 26.5
    assert float(_rule("trimmed_mean", [5.0], trim=0.4)["a.w"]) == 5.0  # never trims away every client


def test_robust_rules_respect_modality_ownership():
    owner = {"a.w": "a", "b.w": "b"}.get
    out = _rule("median", [1.0, 2.0, 100.0], owner=owner, mods={2: ("a",)})
    assert float(out["a.w"]) == 2.0
    assert float(out["b.w"]) == -1.5  # b averaged over the two clients holding b only


def test_clipping_scales_the_change_down_to_the_bound():
    u = ClientUpdate(0, {"a.w": torch.tensor([3.0]), "b.w": torch.tensor([4.0])}, 1, ("a", "b"))
    assert change_norm(GLOBAL, u.state) == 5.0
    clipped = clip_change(GLOBAL, u, 1.0)
    assert torch.allclose(clipped.state["a.w"], torch.tensor([0.6])) and change_norm(GLOBAL, clipped.state) == \
        pytest.approx(1.0)
    assert clip_change(GLOBAL, u, 10.0) is u


def test_the_server_settings_are_validated_by_name(tiny):
    from fedcmi.config import ConfigError

    with pytest.raises(ConfigError, match="server.rule"):
        tiny(server={"rule": "mode"})
    with pytest.raises(ConfigError, match="server.trimmed_mean.trim_fraction"):
        tiny(server={"trimmed_mean": {"trim_fraction": 0.5}})
    with pytest.raises(ConfigError, match="server.max_change_ratio"):
        tiny(server={"max_change_ratio": float("inf")})


@pytest.mark.parametrize("server", [{"rule": "median"}, {"rule": "trimmed_mean", "trimmed_mean": {"trim_fraction": 0.34}},
                                    {"rule": "krum"}, {"rule": "multi_krum", "multi_krum": {"select": 2}},
                                    {"clip_norm": 0.05}])
def test_a_robust_server_keeps_the_honest_model_with_a_liar_in_the_round(round_files, tmp_path, tiny, server):
    """A liar within the change bound (10x its honest change, claiming its whole shard) moves the mean far,
    the robust rules little."""
    cfg, g, clients, honest, expected = round_files
    g_state, _ = load_state(g)
    liar = lie(honest[0], tmp_path / "liar.safetensors",
               lambda s: {k: g_state[k] + 8 * (v - g_state[k]) if v.is_floating_point() else v for k, v in s.items()})
    mean_state, _ = conclude(cfg, g, [liar, *honest[1:]], tmp_path)
    robust_cfg = config_from_dict(merge(cfg.to_dict(), {"server": server}))
    robust_state, rec = aggregate_step(robust_cfg, g, [liar, *honest[1:]], 1, tmp_path / "r.safetensors")
    robust_state, summary = load_state(robust_state)[0], summary_of(rec)
    assert summary["accepted"] == clients
    assert change_norm(expected, robust_state) < 0.5 * change_norm(expected, mean_state)
    if "clip_norm" in server:
        assert summary["clipped"] >= 1
