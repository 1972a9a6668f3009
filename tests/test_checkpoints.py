"""Checkpoints damaged in ways that still parse, state.json damaged, and pruning across runs.

Every damaged file must be caught on load (its checksum), the run must fall back to the newest good
round of its own settings and end with exactly the model of an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from fedcmi.io import ModelFileError, load_state, read_state_meta
from fedcmi.runners.engine import train

ROUNDS = {"rounds": 3, "clients_per_round": 2, "batch_size": 16, "local_epochs": 1}


def header(path: Path) -> tuple[int, dict, bytes]:
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return n, json.loads(raw[8:8 + n]), raw


def rewrite_header(path: Path, edit) -> None:
    """Change the header's text in place, keeping its length (a change that still parses)."""
    n, _, raw = header(path)
    text = raw[8:8 + n].decode()
    new = edit(text)
    assert len(new) == len(text) and new != text
    path.write_bytes(raw[:8] + new.encode() + raw[8 + n:])


def _dtype_flip(text: str) -> str:
    return text.replace('"dtype":"F32"', '"dtype":"I32"', 1)


def _transpose(text: str) -> str:
    h = json.loads(text)
    key = next(k for k, v in h.items() if k != "__metadata__" and len(v["shape"]) == 2
               and v["shape"][0] != v["shape"][1] and len(str(v["shape"][0])) == len(str(v["shape"][1])))
    a, b = h[key]["shape"]
    old = f'"{key}":{{"data_offsets":{json.dumps(h[key]["data_offsets"], separators=(",", ":"))},"dtype":"F32",' \
          f'"shape":[{a},{b}]}}'
    assert old in text
    return text.replace(old, old.replace(f"[{a},{b}]", f"[{b},{a}]"))


def _meta_flip(text: str) -> str:
    return text.replace('\\"round\\": 3', '\\"round\\": 2', 1)  # valid JSON that says something else


def _data_flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40
    path.write_bytes(bytes(raw))


DAMAGE = {"a header dtype F32 -> I32": _dtype_flip, "a transposed shape in the header": _transpose,
          "the round in the metadata": _meta_flip, "one bit of the data": None}


@pytest.fixture
def baseline(tiny):
    cfg = tiny(federation=ROUNDS, output={"keep_checkpoints": 2})
    return cfg, train(cfg, cfg.output.dir / "base", progress=False)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def rounds(history) -> list[dict]:
    """The history without wall-clock seconds (the one field a rerun changes)."""
    return [{k: v for k, v in r.to_json().items() if k != "seconds"} for r in history]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_caught_and_the_run_resumes_before_it(baseline, damage, caplog):
    cfg, base = baseline
    run = cfg.output.dir / "run"
    train(cfg, run, progress=False)
    newest = run / "checkpoints" / "round_00003.safetensors"
    if DAMAGE[damage] is None:
        _data_flip(newest)
    else:
        rewrite_header(newest, DAMAGE[damage])
    with pytest.raises(ModelFileError, match="does not match its checksum"):
        load_state(newest)
    with caplog.at_level(logging.WARNING, logger="fedcmi"):
        res = train(cfg, run, progress=False)
    assert res.resumed_from == 2 and "resuming after round 2 instead" in caplog.text
    assert same(res.state, base.state) and rounds(res.history) == rounds(base.history)


@pytest.mark.parametrize("edit", ["drop model_file", "model_file outside", "garbage", "history cut",
                                  "completed as text"])
def test_a_damaged_state_json_falls_back_to_the_newest_good_checkpoint(baseline, edit, caplog):
    cfg, base = baseline
    run = cfg.output.dir / "run"
    train(cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 2})}), run,
          progress=False)
    state_file = run / "checkpoints" / "state.json"
    meta = json.loads(state_file.read_text())
    if edit == "garbage":
        state_file.write_bytes(b"\x00\xffnot json")
    else:
        if edit == "drop model_file":
            del meta["model_file"]
        elif edit == "model_file outside":
            meta["model_file"] = "../../../etc/passwd"
        elif edit == "history cut":
            meta["history"] = meta["history"][:1]
        else:
            meta["completed_rounds"] = "2"
        state_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="fedcmi"):
        res = train(cfg, run, progress=False)
    assert "state.json is" in caplog.text and "newest good checkpoint" in caplog.text
    assert res.resumed_from == 2
    assert same(res.state, base.state) and rounds(res.history) == rounds(base.history)


def test_pruning_never_removes_the_current_runs_checkpoints_for_an_earlier_runs(tiny):
    """An earlier run with other settings left rounds 2 and 3; a new run's rounds 1 and 2 must both stay
    (keep_checkpoints: 2), and the earlier run's round 3 is not the new run's to remove."""
    cfg = tiny(federation=ROUNDS, output={"keep_checkpoints": 2})
    run = cfg.output.dir / "run"
    train(cfg, run, progress=False)
    other = cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": cfg.optim.lr / 2}),
                                   "federation": cfg.federation.model_copy(update={"rounds": 2})})
    res = train(other, run, progress=False)  # other settings: starts over
    assert res.resumed_from == 0
    folder = run / "checkpoints"
    names = sorted(p.name for p in folder.glob("round_*.safetensors"))
    assert names == ["round_00001.safetensors", "round_00002.safetensors", "round_00003.safetensors"]
    ids = {n: read_state_meta(folder / n).get("run_id") for n in names}
    assert ids["round_00001.safetensors"] == ids["round_00002.safetensors"] != ids["round_00003.safetensors"]
    # the new run's newest is damaged: it falls back to its own round 1, never to the earlier run's round 3
    _data_flip(folder / "round_00002.safetensors")
    again = train(other, run, progress=False)
    assert again.resumed_from == 1
    assert same(again.state, res.state)


def test_a_run_started_over_keeps_its_own_newest_checkpoint(tiny):
    """--resume never over a longer run with the same settings: its round 1 is newest, not the lowest-numbered
    file to prune."""
    cfg = tiny(federation=ROUNDS, output={"keep_checkpoints": 1})
    run = cfg.output.dir / "run"
    train(cfg, run, progress=False)
    short = cfg.model_copy(update={"federation": cfg.federation.model_copy(update={"rounds": 1})})
    train(short, run, progress=False, resume="never")
    assert (run / "checkpoints" / "round_00001.safetensors").is_file()
    state = json.loads((run / "checkpoints" / "state.json").read_text())
    assert state["model_file"] == "round_00001.safetensors" and state["completed_rounds"] == 1
