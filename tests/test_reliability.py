"""Reliability, round three: the cases a hostile or careless user found past the other fault suites. Each
test fails on the tree before the fix (the message or the effect it quotes) and passes after."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_hostile import ROUNDS, conclude, lie, round_files  # noqa: F401 - the fixture is used by name

from fedcmi.config import ConfigError, load_config
from fedcmi.data.base import DataError
from fedcmi.datasets.npz import NpzSource
from fedcmi.federation import Federation
from fedcmi.io import ForeignFile, ModelFileError, load_state, save_state, write_json
from fedcmi.partition import PartitionError, load_partition
from fedcmi.runners.engine import train

# -- 1. a wrong path never overwrites a file fedcmi did not write ------------------------------------------


@pytest.mark.parametrize("content", [b"seed: 3\n", b"# my notes\n", b'{"name": "my-package"}', b"\x89PNG\r\n\x1a\n"])
def test_a_json_writer_never_replaces_a_file_of_another_kind(tmp_path, content):
    target = tmp_path / "mine"
    target.write_bytes(content)
    with pytest.raises(ForeignFile, match="refusing to overwrite"):
        write_json(target, {"num_clients": 4, "clients": []})
    assert target.read_bytes() == content and [p.name for p in tmp_path.iterdir()] == ["mine"]


def test_fedcmi_replaces_its_own_files_and_a_model_file_only_with_a_model(tmp_path):
    write_json(tmp_path / "stats.json", {"num_clients": 4})
    write_json(tmp_path / "stats.json", {"num_clients": 5, "size_min": 2})  # its own record, rewritten
    save_state(tmp_path / "m.safetensors", {"w": torch.zeros(2)})
    save_state(tmp_path / "m.safetensors", {"w": torch.ones(2)})
    with pytest.raises(ForeignFile, match="fedcmi-state"):
        write_json(tmp_path / "m.safetensors", {"mm_acc": 0.5})
    with pytest.raises(ForeignFile, match="it is a folder"):
        write_json(tmp_path, {"a": 1})


# -- 2. an impostor cannot take an honest client's slot, whatever the file order ----------------------------


def test_a_relabelled_copy_is_refused_and_the_honest_client_counted_in_any_order(round_files, tmp_path):  # noqa: F811
    cfg, g, clients, honest, expected = round_files
    a, b = clients[0], clients[1]
    impostor = lie(honest[0], tmp_path / "impostor.safetensors", client_id=b)  # a's update under b's id
    for files in ([impostor, *honest], [*honest, impostor], [honest[1], impostor, honest[0], *honest[2:]]):
        state, summary = conclude(cfg, g, files, tmp_path)
        assert summary["accepted"] == clients
        refused = [r for k, r in summary["rejected"].items() if k < 0]
        assert refused == [f"impostor.safetensors claims client {b} but carries client {a}'s update, byte for "
                           "byte: a relabelled copy, refused"]
        assert b not in summary["rejected"] and all(torch.equal(state[k], expected[k]) for k in expected)


def test_two_different_files_claiming_one_client_count_for_neither(round_files, tmp_path):  # noqa: F811
    cfg, g, clients, honest, _ = round_files
    other = lie(honest[0], tmp_path / "other.safetensors", change_state=lambda s: {k: v * 1.01 for k, v in s.items()})
    for files in ([other, *honest], [*honest, other]):
        _, summary = conclude(cfg, g, files, tmp_path)
        assert clients[0] not in summary["accepted"]
        assert summary["rejected"][clients[0]].startswith(f"client {clients[0]} is claimed by 2 different files")


# -- 3. client-sent server state is bounded like the weights ------------------------------------------------


def test_poisoned_control_variates_are_refused_and_the_run_finishes(tiny, monkeypatch):
    cfg = tiny(algorithm={"name": "scaffold"}, federation={"rounds": 3, "clients_per_round": 3})
    honest = Federation.train_client
    victim: list[int] = []

    def poisoned(self, global_state, cid, round_no):
        u = honest(self, global_state, cid, round_no)
        if u is not None and round_no == 1 and not victim:
            victim.append(cid)
            u.extra = {k: torch.full_like(v, 1e30) for k, v in u.extra.items()}
        return u

    monkeypatch.setattr(Federation, "train_client", poisoned)
    res = train(cfg, cfg.output.dir / "poisoned", progress=False)  # before: diverged in round 2, "lower optim.lr"
    first = res.history[0].participation
    assert "its control variates moved by" in first.rejected[victim[0]]
    assert all(len(r.participation.accepted) == 3 for r in res.history[1:])
    last = sorted((cfg.output.dir / "poisoned" / "checkpoints").glob("round_*.safetensors"))[-1]
    server_c = [v for k, v in load_state(last, checked=True)[0].items() if k.startswith("aux/control/server/")]
    assert server_c and max(float(v.abs().max()) for v in server_c) < 1e3  # before: 2.5e29


# -- 5. a partition entry cannot list a modality twice -----------------------------------------------------


def test_a_modality_listed_twice_in_a_partition_entry_is_refused(tiny):
    cfg = tiny()
    raw = json.loads(cfg.partition.file.read_text())
    raw["clients"][0]["modalities"] = ["audio", "audio"]
    cfg.partition.file.write_text(json.dumps(raw))
    with pytest.raises(PartitionError, match=r"lists a modality twice: \['audio', 'audio'\]"):
        load_partition(cfg.partition.file)


# -- 6. declaring the first format does not skip the checksum -----------------------------------------------


def _relabel_first_format(path: Path, change) -> None:
    """What the attack did: the file re-saved as plain safetensors declaring fedcmi-state/1, no checksum."""
    from safetensors.torch import save_file

    state, meta = load_state(path)
    save_file({k: change(v) for k, v in state.items()}, str(path),
              metadata={"format": "fedcmi-state/1", "meta": json.dumps(meta)})


def test_a_first_format_file_is_refused_where_a_checked_one_is_expected(tiny, tmp_path):
    cfg = tiny()
    res = train(cfg, cfg.output.dir / "run", progress=False)
    ckpt = sorted((cfg.output.dir / "run" / "checkpoints").glob("round_*.safetensors"))[-1]
    _relabel_first_format(ckpt, lambda v: v * 2 if v.is_floating_point() else v)
    with pytest.raises(ModelFileError, match="declares fedcmi-state/1, the format before checksums"):
        load_state(ckpt)
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({k: -v if v.is_floating_point() else v for k, v in res.state.items()}, str(plain))
    with pytest.raises(ModelFileError, match="not a checksummed fedcmi file"):
        load_state(plain, checked=True)  # the served weights are read so
    assert load_state(plain)[0]  # a user's own plain weights still evaluate


# -- 7. an npz's members are checked before anything is allocated -------------------------------------------


def _npz(folder: Path, members: dict[str, bytes]) -> None:
    folder.mkdir(exist_ok=True)
    ok = {"audio": np.zeros((8, 3), np.float32), "visual": np.zeros((8, 2), np.float32),
          "label": np.arange(8) % 2}
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", **ok)
    with zipfile.ZipFile(folder / "train.npz", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def _npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _huge_header() -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (10**12, 5)})
    return buf.getvalue() + b"\0" * 64


@pytest.mark.parametrize("members, says", [
    ({"audio.npy": _huge_header(), "visual.npy": _npy(np.zeros((8, 2), np.float32)), "label.npy": _npy(np.arange(8))},
     r"declares shape \(1000000000000, 5\) float32 \(20,000,000,000,000 bytes\) but holds"),
    ({"audio.npy": b"\x80\x04not an array", "visual.npy": _npy(np.zeros((8, 2), np.float32)),
      "label.npy": _npy(np.arange(8))}, "is not a numpy array"),
    ({"audio.npy": _npy(np.array([{"a": 1}] * 8, dtype=object)), "visual.npy": _npy(np.zeros((8, 2), np.float32)),
      "label.npy": _npy(np.arange(8))}, "holds Python objects"),
])
def test_an_npz_member_that_lies_is_one_clear_error_before_allocation(tmp_path, members, says):
    _npz(tmp_path / "d", members)
    with pytest.raises(DataError, match=says):
        NpzSource(tmp_path / "d", ("audio", "visual")).generate()


def test_an_npz_with_a_member_named_twice_is_refused(tmp_path):
    _npz(tmp_path / "d", {"audio.npy": _npy(np.zeros((8, 3), np.float32)),
                          "visual.npy": _npy(np.zeros((8, 2), np.float32)), "label.npy": _npy(np.arange(8))})
    with pytest.warns(UserWarning, match="Duplicate name"), zipfile.ZipFile(tmp_path / "d" / "train.npz", "a") as z:
        z.writestr("audio.npy", _npy(np.ones((8, 3), np.float32)))
    with pytest.raises(DataError, match=r"members named twice \(\['audio.npy'\]\)"):
        NpzSource(tmp_path / "d", ("audio", "visual")).generate()


# -- 13. params files: a key given twice, a file far too large ----------------------------------------------


def test_a_setting_given_twice_is_refused_naming_both_lines(tmp_path):
    (tmp_path / "p.yaml").write_text("seed: 1\nfederation:\n  rounds: 3\n  rounds: 30\n")
    with pytest.raises(ConfigError, match=r"setting 'rounds' is given twice in one section \(lines 3 and 4\)"):
        load_config(tmp_path / "p.yaml")


def test_a_params_file_far_too_large_is_refused_before_parsing(tmp_path):
    (tmp_path / "p.yaml").write_text(yaml.safe_dump({f"k{i}": i for i in range(80_000)}))
    with pytest.raises(ConfigError, match="a params file is at most 1,000,000"):
        load_config(tmp_path / "p.yaml")


def test_rounds_used_by_the_fixture():
    assert ROUNDS["clients_per_round"] >= 3  # the impostor cases need three honest clients


# -- 14. a run that collapsed from its peak or swung is reported unstable, and not registered --------------


def test_a_collapsed_or_swinging_run_is_unstable_and_a_steady_or_short_one_is_not():
    from fedcmi.stability import stability

    swinging = list(enumerate([0.3, 0.5, 0.66, 0.2, 0.6, 0.16, 0.55, 0.3, 0.21], 1))  # FedAvg at lr 0.4
    s = stability(swinging, chance=0.17)
    assert s.unstable and s.peak == 0.66 and s.peak_round == 3
    assert s.reason(0.4).startswith("unstable: it fell from 0.660 (round 3) to 0.210, losing 92% of its gain")
    assert "try 0.1" in s.reason(0.4)
    steady = list(enumerate([0.4, 0.6, 0.7, 0.74, 0.78, 0.77, 0.79, 0.8], 1))
    assert not stability(steady, chance=0.17).unstable
    assert not stability(swinging[:4], chance=0.17).unstable  # four evaluations: too few to judge
    assert not stability(list(enumerate([0.2, 0.21, 0.19, 0.2, 0.18], 1)), chance=0.17).unstable  # never rose


@pytest.mark.slow
def test_register_refuses_an_unstable_run_in_one_line(tmp_path):
    from test_cli import _params, fedcmi

    _params(tmp_path)
    raw = yaml.safe_load((tmp_path / "params.yaml").read_text())
    raw["tracking"] = {**raw["tracking"], "enabled": True, "tracking_uri": f"sqlite:///{tmp_path}/m.db"}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    for args in (["prepare"], ["partition"], ["train", "--no-progress"],
                 ["evaluate", "--out", "outputs/eval/metrics.json"]):
        r = fedcmi(*args, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-2000:]
    history = tmp_path / "outputs/train/history.json"
    rows = json.loads(history.read_text())
    curve = [0.3, 0.5, 0.66, 0.2, 0.6, 0.16, 0.55, 0.3, 0.21]  # what a too-high lr gave on real data
    history.write_text(json.dumps([{**rows[-1], "round": i + 1, "mm_acc": a} for i, a in enumerate(curve)]))
    r = fedcmi("register", "--out", "outputs/register.json", cwd=tmp_path)
    assert r.returncode == 0 and "Traceback" not in r.stderr
    assert r.stderr.startswith("fedcmi: not registered: the run is unstable: it fell from 0.660 (round 3)")
    assert json.loads((tmp_path / "outputs/register.json").read_text())["registered"] is False


# -- 12. prepared data edited after `prepare` is refused by every reader; prepare waits for its readers ----


def _edit(path: Path, change) -> None:
    """Rewrite an array file in place, same shape and dtype (as a hand edit would)."""
    arr = np.load(path)
    np.save(path, change(arr.copy()))


def test_prepared_data_edited_after_prepare_is_refused_on_opening(tiny):
    from fedcmi.data import DataModule

    cfg = tiny()
    root = Path(cfg.data.prepared_dir)
    DataModule(root)  # as prepared: opens
    train_file = sorted((root / "train").glob("*.npy"))[0]
    _edit(train_file, lambda a: a * 1000 if a.dtype.kind == "f" else a[::-1])
    with pytest.raises(DataError, match=f"{train_file.name} changed after `fedcmi prepare` wrote it .*contents "
                                        "differ.*rerun `fedcmi prepare`"):
        DataModule(root)
    cfg = tiny()  # prepared again: a float test feature set to Inf
    test_file = next(p for p in sorted((root / "test").glob("*.npy")) if np.load(p).dtype.kind == "f")

    def inf(a):
        a.reshape(-1)[5] = np.inf
        return a

    _edit(test_file, inf)
    with pytest.raises(DataError, match="changed after `fedcmi prepare`"):
        DataModule(root)
    cfg = tiny()  # prepared again: a split cut short, meta.json left as it was
    np.save(test_file, np.load(test_file)[:-3])
    with pytest.raises(DataError, match="bytes where prepare wrote"):
        DataModule(root)


def test_a_nan_sample_the_stamp_misses_names_itself_in_its_clients_rejection(tiny):
    """An edit between the sampled blocks of a large file passes the stamp (simulated here by stamping the
    edited folder again); the batch holding the NaN sample names it, so the client's rejection says why."""
    from fedcmi.data.base import META, stamps
    from fedcmi.round.schedule import sample_clients

    cfg = tiny(federation={"rounds": 2, "clients_per_round": 2})
    root = Path(cfg.data.prepared_dir)
    client = sample_clients(cfg, 1)[0]
    entry = load_partition(cfg.partition.file).clients[client]
    modality = sorted(entry.modalities)[0]
    row = int(sorted(entry.indices)[1])

    def nan(a):
        a[row].reshape(-1)[0] = np.nan
        return a

    _edit(root / "train" / f"{modality}.npy", nan)
    meta = json.loads((root / META).read_text())
    (root / META).write_text(json.dumps({**meta, "stamps": stamps(root)}))
    result = train(cfg, Path(cfg.output.dir) / "nan", progress=False)
    reasons = [r.participation.rejected.get(client) for r in result.history
               if client in r.participation.rejected]
    assert reasons, "the client holding the NaN sample was not rejected"
    assert all(f"sample {row} of the prepared train split holds NaN or infinite {modality} features" in r
               for r in reasons), reasons


def test_prepare_waits_for_its_readers_and_readers_for_prepare(tmp_path):
    """A `prepare` while a train reads the data is refused (the data unchanged), and a train while a
    prepare writes it is refused, each in one line."""
    from test_cli import _params, fedcmi

    from fedcmi.data import reading
    from fedcmi.locks import beside, exclusive

    _params(tmp_path)
    for args in (["prepare"], ["partition"]):
        assert fedcmi(*args, cwd=tmp_path).returncode == 0
    prepared = tmp_path / "data" / "prepared"
    before = (prepared / "meta.json").read_bytes()
    with reading(prepared):  # a train (here: this process) reads the data
        r = fedcmi("prepare", "--set", "seed=9", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "the prepared data data/prepared is being read by another fedcmi process" in r.stderr, r.stderr
    assert (prepared / "meta.json").read_bytes() == before
    with exclusive(beside(prepared), "the prepared data"):  # a prepare (here: this process) writes it
        r = fedcmi("train", "--no-progress", cwd=tmp_path)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "the prepared data data/prepared is being written by process" in r.stderr, r.stderr
    assert not (tmp_path / "outputs" / "train").exists()
