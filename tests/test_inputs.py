"""Hostile or mistaken inputs: npz files, params files and overrides, step arguments, pipeline paths.

Each is one clear error before anything is trained or written, never a traceback, a silent
conversion, or an allocation sized by a number in the input.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TINY, merge
from faults import ROOT, run_cli

from fedcmi.config import ConfigError, load_config
from fedcmi.data import DataError
from fedcmi.datasets.npz import NpzSource
from fedcmi.runners.store import StoreError, check_within, resolve_store

MODS = ("vec", "img")


def write(root: Path, split: str = "train", n: int = 12, **changes) -> Path:
    rng = np.random.default_rng(0)
    arrays = {"vec": rng.standard_normal((n, 4)).astype(np.float32),
              "img": rng.standard_normal((n, 1, 4, 4)).astype(np.float32),
              "label": (np.arange(n) % 3).astype(np.int64)}
    arrays.update(changes)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / f"{split}.npz", **arrays)
    return root


def layout(root: Path, **train_changes) -> NpzSource:
    write(root, "test")
    write(root, "train", **train_changes)
    return NpzSource(root, MODS)


NPZ = {
    "float64 1e300": (dict(vec=np.full((12, 4), 1e300)), "beyond float32's range"),
    "labels 0 and 1e9": (dict(label=np.array([0, 10**9] * 6)), "999999999 class(es) never occur"),
    "labels 0 and 200000": (dict(label=np.array([0, 200_000] * 6)), "199999 class(es) never occur"),
    "labels 0 and 7": (dict(label=np.array([0, 7] * 6)), "such as [1, 2, 3, 4, 5]"),
    "a single class": (dict(label=np.zeros(12, np.int64)), "holds one class (0): a classifier needs at least two"),
    "a modality of shape (N, 0)": (dict(vec=np.zeros((12, 0), np.float32)), "non-empty feature axes"),
    "fewer labels than samples": (dict(label=np.arange(6) % 3), "holds 12 samples, 'label' 6"),
}


@pytest.mark.parametrize("case", list(NPZ))
def test_a_bad_npz_is_one_clear_error(tmp_path, case):
    changes, needle = NPZ[case]
    with pytest.raises(DataError, match=None) as err:
        layout(tmp_path, **changes).generate()
    assert needle in str(err.value)


def test_an_empty_test_split_is_refused_at_prepare(tmp_path):
    write(tmp_path, "train")
    write(tmp_path, "test", n=0, vec=np.zeros((0, 4), np.float32), img=np.zeros((0, 1, 4, 4), np.float32),
          label=np.zeros(0, np.int64))
    with pytest.raises(DataError, match="test.npz holds no samples"):
        NpzSource(tmp_path, MODS).generate()


def test_a_pickled_member_is_refused_and_never_unpickled(tmp_path):
    ran = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (Path.touch, (ran,))

    write(tmp_path, "test")
    obj = np.empty(12, dtype=object)
    obj[:] = [Evil()] * 12
    np.savez(tmp_path / "train.npz", vec=obj, img=np.zeros((12, 1, 4, 4), np.float32), label=np.arange(12) % 3)
    with pytest.raises(DataError, match="holds Python objects \\(a pickle\\); fedcmi reads only numeric arrays"):
        NpzSource(tmp_path, MODS).generate()
    assert not ran.exists()


@pytest.mark.parametrize("content,needle", [
    ("npy", "it is a single .npy array"),
    ("text", "it is not a zip archive"),
    ("pickle", "it is not a zip archive"),
])
def test_a_file_that_is_not_an_npz_archive_is_named_as_such(tmp_path, content, needle):
    write(tmp_path, "test")
    path = tmp_path / "train.npz"
    if content == "npy":
        with open(path, "wb") as fh:
            np.save(fh, np.zeros((12, 4), np.float32))
    elif content == "text":
        path.write_text("vec,img,label\n1,2,3\n")
    else:
        path.write_bytes(pickle.dumps({"vec": [1, 2]}))
    with pytest.raises(DataError) as err:
        NpzSource(tmp_path, MODS).generate()
    assert needle in str(err.value) and "allow_pickle" not in str(err.value)


# -- params -----------------------------------------------------------------------------------------------------
def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path):
    lines = ["seed: 0", "a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 12)]
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError, match="expands to more than 100000 values"):
        load_config(tmp_path / "params.yaml", ["seed=1"])


@pytest.mark.parametrize("where", ["file", "override"])
def test_yaml_nested_past_reason_is_refused(tmp_path, where):
    deep = "[" * 50_000 + "]" * 50_000
    if where == "file":
        (tmp_path / "params.yaml").write_text(f"seed: {deep}\n")
        path, overrides = tmp_path / "params.yaml", []
    else:
        path, overrides = ROOT / "params.yaml", [f"seed={deep}"]
    with pytest.raises(ConfigError, match="nested too deeply"):
        load_config(path, overrides)


@pytest.mark.parametrize("key", ["optim.lr", "algorithm.mu", "algorithm.fedcmi.w_uni", "algorithm.fedcmi.temperature",
                                 "algorithm.ogm.alpha", "partition.alpha", "data.synthetic.strong_snr",
                                 "server.clip_norm"])
@pytest.mark.parametrize("value", [".inf", ".nan"])
def test_infinite_or_nan_settings_are_refused_by_name(key, value):
    with pytest.raises(ConfigError, match=f"{key.replace('.', '[.]')}: Input should be a finite number"):
        load_config(ROOT / "params.yaml", [f"{key}={value}"])


@pytest.mark.parametrize("key", ["federation.rounds", "seed", "partition.num_clients", "optim.lr"])
def test_true_is_never_a_number(key):
    with pytest.raises(ConfigError, match=f"{key.replace('.', '[.]')}: Input should be a valid"):
        load_config(ROOT / "params.yaml", [f"{key}=true"])


def test_exponent_notation_is_a_number():
    assert load_config(ROOT / "params.yaml", ["optim.lr=1e-3"]).optim.lr == 1e-3


def test_a_bad_headline_metric_is_refused_when_params_load():
    with pytest.raises(ConfigError, match="tracking.headline_metric 'accuracy' is not a figure"):
        load_config(ROOT / "params.yaml", ["tracking.headline_metric=accuracy"])


# -- step arguments and pipeline paths --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    for cmd in ("prepare", "partition"):
        assert run_cli([cmd], root).returncode == 0
    return root


@pytest.mark.parametrize("rnd", ["-1", "0", str(10**30), "3"])
def test_a_round_outside_the_federation_is_one_clear_error(project, tmp_path, rnd):
    r = run_cli(["init", "--out", str(tmp_path / "g.safetensors")], project)
    assert r.returncode == 0, r.stderr
    r = run_cli(["client-train", "--global-model", str(tmp_path / "g.safetensors"), "--client", "0",
                 "--round", rnd, "--out", str(tmp_path / "u.safetensors")], project)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "is not a round of this federation: rounds are 1..2" in r.stderr
    assert not (tmp_path / "u.safetensors").exists()


@pytest.mark.parametrize("store", ["/tmp/elsewhere", "../outside", "."])
def test_a_store_outside_the_data_volume_is_refused(tmp_path, store):
    with pytest.raises(StoreError, match="outside the data volume"):
        resolve_store(store, "", tmp_path)


@pytest.mark.parametrize("field,value", [("data.prepared_dir", "/etc"), ("partition.file", "../../p.json")])
def test_data_paths_outside_the_data_volume_are_refused(tmp_path, field, value):
    cfg = load_config(ROOT / "params.yaml", [f"{field}={value}"])
    with pytest.raises(StoreError, match=f"{field} .* lies outside"):
        check_within(cfg, tmp_path)
