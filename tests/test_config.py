"""The config model: defaults, overrides, and one clear message per bad value."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcmi.config import Config, ConfigError, config_from_dict, load_config

ROOT = Path(__file__).resolve().parents[1]


def test_params_yaml_holds_exactly_the_defaults():
    assert load_config(ROOT / "params.yaml") == Config()


def test_dotted_overrides_are_typed():
    cfg = load_config(ROOT / "params.yaml", ["algorithm.name=fedavg", "federation.rounds=3", "optim.lr=1e-3"])
    assert cfg.algorithm.name == "fedavg" and cfg.federation.rounds == 3 and cfg.optim.lr == 1e-3


@pytest.mark.parametrize(
    "raw,needle",
    [
        ({"algorithm": {"name": "fedvag"}}, "algorithm.name"),
        ({"federaton": {}}, "federaton: unknown setting"),
        ({"optim": {"lr": -1}}, "optim.lr"),
        ({"partition": {"alpha": 0}}, "partition.alpha"),
        ({"model": {"encoders": {"audio": "cnn"}}}, "model.encoders must name exactly"),
        ({"algorithm": {"name": "unimodal"}}, "algorithm.modality"),
        ({"federation": {"clients_per_round": 50}}, "clients_per_round"),
        ({"data": {"modalities": ["audio", "audio"]}}, "different names"),
    ],
)
def test_bad_values_name_the_field(raw, needle):
    with pytest.raises(ConfigError) as exc:
        config_from_dict(raw)
    assert needle in str(exc.value)
    assert "Traceback" not in str(exc.value)


def test_missing_params_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["seed"])


scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=8), st.lists(st.integers(), max_size=3))


@settings(max_examples=300, deadline=None)
@given(section=st.sampled_from(sorted(Config.model_fields)), key=st.text(min_size=1, max_size=12), value=scalars)
def test_fuzzed_settings_give_a_validation_error_or_a_config_never_a_traceback(section, key, value):
    try:
        cfg = config_from_dict({section: {key: value}})
    except ConfigError as exc:
        assert str(exc).startswith("invalid configuration")
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(path=st.sampled_from(sorted(Config().flat())), value=scalars)
def test_fuzzed_known_fields_never_raise_anything_but_config_error(path, value):
    raw: dict = {}
    node = raw
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    try:
        config_from_dict(raw)
    except ConfigError:
        pass


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=60))
def test_fuzzed_override_strings_never_raise_anything_but_config_error(text):
    try:
        cfg = load_config(ROOT / "params.yaml", [text])
    except ConfigError as exc:
        assert str(exc)
    else:
        assert isinstance(cfg, Config)


documents = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
        st.one_of(st.sampled_from(sorted(Config.model_fields)), st.text(max_size=6), st.integers()), inner,
        max_size=4),
    max_leaves=16)


@settings(max_examples=300, deadline=None)
@given(doc=documents)
def test_fuzzed_params_documents_give_a_validation_error_or_a_config(tmp_path_factory, doc):
    import yaml

    path = tmp_path_factory.getbasetemp() / "fuzz_params.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        cfg = load_config(path)
    except ConfigError as exc:
        assert str(exc).startswith(("invalid configuration", f"{path} is not valid YAML"))
    else:
        assert isinstance(cfg, Config)


@settings(max_examples=200, deadline=None)
@given(text=st.text(max_size=200))
def test_fuzzed_params_file_text_never_raises_anything_but_config_error(tmp_path_factory, text):
    path = tmp_path_factory.getbasetemp() / "fuzz_text.yaml"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        load_config(path)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=200))
def test_fuzzed_params_file_bytes_never_raise_anything_but_config_error(tmp_path_factory, data):
    path = tmp_path_factory.getbasetemp() / "fuzz_bytes.yaml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError:
        pass


def test_a_protocol_fixes_its_settings_in_one_line_and_refuses_a_contradiction():
    from fedcmi.config import ConfigError, config_from_dict

    cfg = config_from_dict({"protocol": "fedmultimodal-cremad"})
    from fedcmi.datasets.cremad import CremaDOptions

    opts = cfg.data.options(CremaDOptions)
    assert (cfg.data.name, opts.labels, opts.split, cfg.partition.scheme, cfg.tracking.headline_metric) == (
        "cremad", "vote4", "speaker_folds", "natural", "mm_uar")
    # a params file lists every setting at its default: the protocol wins over a default, not over a choice
    assert config_from_dict({"protocol": "fedcmi-cremad", "partition": {"scheme": "dirichlet"},
                             "tracking": {"headline_metric": "mm_acc"}}).data.name == "cremad"
    with pytest.raises(ConfigError, match="tracking.headline_metric is 'mm_f1', but protocol fedmultimodal-cremad "
                                          "fixes it to 'mm_uar': remove the setting, or set protocol: null"):
        config_from_dict({"protocol": "fedmultimodal-cremad", "tracking": {"headline_metric": "mm_f1"}})
    with pytest.raises(ConfigError, match=r"protocol: 'fedmultimodal' is not a known protocol; one of "
                                          r"\['fedcmi-cremad', 'fedmultimodal-cremad'\]"):
        config_from_dict({"protocol": "fedmultimodal"})
    with pytest.raises(ConfigError, match="fold 6 of 5 folds does not exist"):
        config_from_dict({"data": {"name": "cremad", "cremad": {"split": "speaker_folds", "fold": 6}}})
