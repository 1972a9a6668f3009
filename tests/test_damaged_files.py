"""Files damaged in ways that still parse: each is one clear error naming the file, never a traceback, a
silently truncated value, or an allocation sized by a number in the file."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from conftest import TINY, merge
from faults import ROOT, run_cli


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("damaged")
    raw = merge(yaml.safe_load((ROOT / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    for cmd in (["prepare"], ["partition"], ["train", "--no-progress"]):
        r = run_cli(cmd, root)
        assert r.returncode == 0, r.stderr
    return root


@pytest.fixture
def copy(project, tmp_path):
    dest = tmp_path / "p"
    shutil.copytree(project, dest)
    return dest


def one_clear_error(r, *needles: str) -> None:
    assert r.returncode == 1, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr[-2000:]
    for n in needles:
        assert n in r.stderr, r.stderr


def _edit_partition(edit):
    def apply(d: dict) -> str:
        edit(d)
        return json.dumps(d)
    return apply


PARTITIONS = {
    "a float index": (_edit_partition(lambda d: d["clients"][0]["indices"].__setitem__(0, 1.5)),
                      "indices must be integers"),
    "an integral float index": (_edit_partition(lambda d: d["clients"][0]["indices"].__setitem__(0, 3.0)),
                                "indices must be integers"),
    "index 2**70": (_edit_partition(lambda d: d["clients"][0]["indices"].__setitem__(0, 2**70)),
                    "indices must be integers in 0.."),
    "num_samples 1e11": (_edit_partition(lambda d: d.__setitem__("num_samples", 10**11)),
                         "num_samples 100000000000 is not a sample count"),
    "num_samples as a float": (_edit_partition(lambda d: d.__setitem__("num_samples", 160.0)),
                               "num_samples 160.0"),
    "one index too few": (_edit_partition(lambda d: d["clients"][0]["indices"].pop()),
                          "indices, num_samples says"),
    "a histogram of the wrong length": (_edit_partition(lambda d: d["clients"][1]["class_histogram"].pop()),
                                        "class_histogram must be"),
    "clients as a mapping": (_edit_partition(lambda d: d.__setitem__("clients", {"0": []})),
                             "clients must be a non-empty list"),
    "200k-deep JSON": (lambda d: "[" * 200_000 + "]" * 200_000, "nested too deeply"),
    "a JSON list": (lambda d: "[1, 2]", "holds a JSON list, expected a JSON object"),
}


@pytest.mark.parametrize("case", list(PARTITIONS))
def test_a_damaged_partition_is_one_clear_error(copy, case):
    edit, needle = PARTITIONS[case]
    path = copy / "data" / "partition.json"
    path.write_text(edit(json.loads(path.read_text())))
    one_clear_error(run_cli(["train", "--no-progress", "--resume", "never"], copy), "partition.json", needle)


def _unstamp(project) -> None:
    """Drop the array stamps from meta.json, as in a folder prepared before they were recorded (or an edit
    that falls between the stamp's sampled blocks of a large file): the checks behind the stamp answer."""
    meta = project / "data" / "prepared" / "meta.json"
    body = json.loads(meta.read_text())
    del body["stamps"]
    meta.write_text(json.dumps(body))


def test_a_label_outside_the_classes_is_one_clear_error(copy):
    path = copy / "data" / "prepared" / "train" / "label.npy"
    labels = np.load(path)
    labels[5] = 200_000
    np.save(path, labels)
    train = ["train", "--no-progress", "--resume", "never"]
    one_clear_error(run_cli(train, copy), "train/label.npy changed after `fedcmi prepare` wrote it")
    _unstamp(copy)
    one_clear_error(run_cli(train, copy), "label.npy", "outside the", "rerun `fedcmi prepare`")


RUN_INFO = {
    "garbage": b"\x00\xffnot json",
    "a list": b"[1, 2]",
    "run_id a number": json.dumps({"run_id": 5}).encode(),
    "run_id a path": json.dumps({"run_id": "../../x", "model_uri": "models:/m"}).encode(),
    "deep": b"{\"a\":" * 100_000 + b"1" + b"}" * 100_000,
}


@pytest.mark.parametrize("case", list(RUN_INFO))
@pytest.mark.parametrize("command", [["register"], ["evaluate", "--log"]])
def test_a_damaged_mlflow_run_json_is_one_clear_error(copy, case, command):
    (copy / "outputs" / "train" / "mlflow_run.json").write_bytes(RUN_INFO[case])
    r = run_cli([*command, "--set", "tracking.enabled=true"], copy)
    one_clear_error(r, "mlflow_run.json")


METRICS = {
    "a list": ([0.5], "holds a JSON list"),
    "the headline as text": ({"mm_acc": "0.9"}, "mm_acc is '0.9', not a finite number"),
    "the headline NaN": ({"mm_acc": float("nan")}, "not a finite number"),
}


@pytest.mark.parametrize("case", list(METRICS))
def test_damaged_evaluation_metrics_are_refused_before_registering(copy, case):
    value, needle = METRICS[case]
    (copy / "outputs" / "train" / "mlflow_run.json").write_text(
        json.dumps({"run_id": "0123abcd", "model_uri": "models:/m-0123abcd", "tracking_uri": "sqlite:///x.db"}))
    metrics = copy / "outputs" / "eval" / "metrics.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps(value))
    r = run_cli(["register", "--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri=sqlite:///{copy}/m.db"],
                copy)
    one_clear_error(r, "metrics.json", needle)
    assert not (copy / "m.db").exists()  # refused before the registry was touched


def test_a_prepared_split_with_fewer_labels_than_samples_is_one_clear_error(copy):
    path = copy / "data" / "prepared" / "test" / "label.npy"
    np.save(path, np.load(path)[:-3])
    one_clear_error(run_cli(["evaluate"], copy), "test/label.npy changed after `fedcmi prepare` wrote it",
                    "bytes where prepare wrote")
    _unstamp(copy)
    one_clear_error(run_cli(["evaluate"], copy), "labels but", "rerun `fedcmi prepare`")



def test_prepared_arrays_changed_by_hand_are_refused_at_register(copy):
    """The data hash of a registered version is the arrays' own: a hand edit after `prepare` would make
    versions measured on other test data look comparable."""
    (copy / "outputs" / "train" / "mlflow_run.json").write_text(
        json.dumps({"run_id": "0123abcd", "model_uri": "models:/m-0123abcd", "tracking_uri": "sqlite:///x.db"}))
    metrics = copy / "outputs" / "eval" / "metrics.json"
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text(json.dumps({"mm_acc": 0.5}))
    path = copy / "data" / "prepared" / "test" / "label.npy"
    labels = np.load(path)
    labels[0] = (labels[0] + 1) % 3
    np.save(path, labels)
    register = ["register", "--set", "tracking.enabled=true", "--set", f"tracking.tracking_uri=sqlite:///{copy}/m.db"]
    one_clear_error(run_cli(register, copy), "test/label.npy changed after `fedcmi prepare` wrote it")
    _unstamp(copy)  # the full content hash, checked on registering, still catches it
    one_clear_error(run_cli(register, copy), "changed after `fedcmi prepare` recorded its hash")
    assert not (copy / "m.db").exists()
