"""The logged model: a pyfunc over named modality arrays, loaded back from a real MLflow store."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.fixture
def logged(tiny, tmp_path):
    """A tiny trained-shape model logged to a SQLite MLflow store; returns (config, package, model uri)."""
    cfg = tiny()
    package, uri = _log(cfg, tmp_path)
    return cfg, package, uri


def _log(cfg, tmp_path):
    """``cfg``'s network (initial weights) logged to a SQLite MLflow store: (its package, its model uri)."""
    import mlflow

    from fedcmi.algorithms import build_model
    from fedcmi.data import DataModule
    from fedcmi.serving import ModelPackage

    data = DataModule(cfg.data.prepared_dir)
    package = ModelPackage.of(cfg, build_model(cfg, data.spec).state_dict(), data)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        with mlflow.start_run():
            uri = package.log()
    finally:
        mlflow.set_tracking_uri(None)
    return package, uri


def _load(uri: str, tmp_path):
    import mlflow.pyfunc

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        return mlflow.pyfunc.load_model(uri)
    finally:
        mlflow.set_tracking_uri(None)


def test_the_model_predicts_a_table_equal_to_the_network(logged, tmp_path):
    cfg, package, uri = logged
    model = _load(uri, tmp_path)
    schema = model.metadata.get_input_schema()
    assert schema.input_names() == ["audio", "visual"]
    x = {m: np.random.default_rng(1).standard_normal((5, *package.spec.shapes[m])).astype(np.float32)
         for m in package.spec.modalities}
    table = model.predict(x)
    assert list(table.columns) == ["class_index", "class_name", *[f"p_{n}" for n in package.spec.class_names],
                                   "path", "path_kind"]
    probs = table.filter(like="p_").to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    net = model.unwrap_python_model().network
    with torch.no_grad():
        logits = net({m: torch.from_numpy(v) for m, v in x.items()})
    assert (logits.argmax(1).numpy() == table["class_index"].to_numpy()).all()
    assert np.allclose(torch.softmax(logits, 1).numpy(), probs, atol=1e-6)
    # the input example is a real test sample, and it round-trips through the signature
    assert model.predict(package.example).shape[0] == 1


def test_the_model_is_code_and_safetensors_not_a_pickle(logged, tmp_path):
    import mlflow

    _, _, uri = logged
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        local = mlflow.artifacts.download_artifacts(uri)
    finally:
        mlflow.set_tracking_uri(None)
    from pathlib import Path

    files = [p.name for p in Path(local).rglob("*") if p.is_file()]
    assert "serving_model.py" in files and "model.safetensors" in files
    assert not [f for f in files if f.endswith((".pkl", ".pickle", ".pt", ".pth"))], files


def _logged_as(cfg, tmp_path):
    """Log ``cfg``'s network (seeded initial weights) and load it back as MLflow serves it."""
    torch.manual_seed(0)
    package, uri = _log(cfg, tmp_path)
    return package, _load(uri, tmp_path)


@pytest.mark.parametrize("algorithm,kind", [("fedcmi", "infiltration"), ("fedavg", "zero-filled fusion"),
                                            ("ume", "ensemble member")])
def test_a_request_may_leave_out_either_modality_and_names_the_path(tiny, tmp_path, algorithm, kind):
    """Issue 25, part 4: the signature states every modality optional; a request with one answers through
    the path the evaluation calls ``path/<m>`` (its logits, not another head's) and says so."""
    cfg = tiny(algorithm={"name": algorithm})
    package, model = _logged_as(cfg, tmp_path)
    schema = model.metadata.get_input_schema()
    assert schema.optional_input_names() == ["audio", "visual"] and schema.required_input_names() == []
    x = {m: np.random.default_rng(2).standard_normal((5, *package.spec.shapes[m])).astype(np.float32)
         for m in package.spec.modalities}
    net = model.unwrap_python_model().network.net
    with torch.no_grad():
        views = net.eval_logits({m: torch.from_numpy(v) for m, v in x.items()})
    both = model.predict(x)
    assert set(both["path"]) == {"mm"} and set(both["path_kind"]) == {"all modalities"}
    assert (both["class_index"].to_numpy() == views["mm"].argmax(1).numpy()).all()
    for m in package.spec.modalities:
        alone = model.predict({m: x[m]})
        assert set(alone["path"]) == {f"path/{m}"} and set(alone["path_kind"]) == {kind}
        assert np.allclose(alone.filter(like="p_").to_numpy(),
                           torch.softmax(views[f"path/{m}"], 1).numpy(), atol=1e-5), m
    with pytest.raises(Exception) as exc:
        model.predict({})
    assert "holds none of the modalities ['audio', 'visual']" in str(exc.value)


def test_a_single_modality_model_says_which_modality_it_reads(tiny, tmp_path):
    cfg = tiny(algorithm={"name": "unimodal", "modality": "visual"})
    package, model = _logged_as(cfg, tmp_path)
    v = package.example["visual"]
    assert set(model.predict({"visual": v})["path"]) == {"mm"}
    with pytest.raises(Exception, match=r"this model reads only \['visual'\], which the request lacks"):
        model.predict({"audio": package.example["audio"]})


def test_a_bad_request_is_one_clear_message_naming_the_input(logged, tmp_path):
    """Round three, case 11: NaN or Inf, batches of different sizes, an empty batch, a wrong sample shape.
    Before, a class with NaN probabilities or a torch RuntimeError; now one ValueError naming the input."""
    from mlflow.exceptions import MlflowException

    _, package, uri = logged
    model = _load(uri, tmp_path)
    a, v = package.example["audio"], package.example["visual"]
    nan = a.astype(np.float32).copy()
    nan.flat[0] = np.nan
    cases = [
        ({"audio": nan, "visual": v}, "input 'audio' holds NaN or Inf"),
        ({"audio": np.concatenate([a, a]), "visual": v}, "the inputs hold different numbers of samples"),
        ({"audio": a[:0], "visual": v[:0]}, "the request holds no samples"),
    ]
    for request, says in cases:
        with pytest.raises((MlflowException, ValueError)) as exc:
            model.predict(request)
        assert says in str(exc.value), str(exc.value)[:300]
        assert "array(" not in str(exc.value)[:200]  # what is wrong first, not a dump of the request
    # a wrong sample shape or dtype: MLflow's signature check answers first (its message ends with the
    # shapes); the model's own check says the same in one line where the signature lets a request through
    from fedcmi.serving import check_request

    for request, says in [({"audio": a[..., :-1], "visual": v}, "input 'audio' has samples of shape"),
                          ({"audio": np.array([["x"] * 3]), "visual": v}, "input 'audio' holds <U1 values")]:
        with pytest.raises(ValueError, match=says):
            check_request(request, package.spec)


def test_whole_number_inputs_are_narrowed_to_the_modality_dtype_or_refused():
    """JSON numbers reach the model as int64 and float64 (the signature takes the widest type so that MLflow
    lets them through); the model narrows them to the prepared dtype, never wrapping a value around."""
    from fedcmi.data.base import DatasetSpec
    from fedcmi.serving import check_request

    spec = DatasetSpec(("audio", "visual"), {"audio": (2,), "visual": (3,)}, 2, dtypes={"visual": "uint8"})
    got = check_request({"visual": np.array([[0, 128, 255]], dtype=np.int64)}, spec)
    assert list(got) == ["visual"] and got["visual"].dtype == np.uint8
    assert check_request({"audio": np.ones((1, 2))}, spec)["audio"].dtype == np.float32
    for bad, says in [(np.array([[0, 1, 256]]), r"input 'visual' holds values outside 0..255 \(uint8\)"),
                      (np.array([[0.5, 1, 2]]), r"input 'visual' holds fractions")]:
        with pytest.raises(ValueError, match=says):
            check_request({"visual": bad}, spec)
    with pytest.raises(ValueError, match=r"the input holds \['depth'\], which the model does not take"):
        check_request({"depth": np.ones((1, 2))}, spec)
