from pathlib import Path

import pytest
import yaml

from tasks.config import ConfigError, Params, load_params, parse_params
from tasks.variants import VARIANTS

REPO = Path(__file__).resolve().parents[2]


def test_shipped_params_load_and_match_defaults_shape():
    params = load_params(REPO / "params.yaml")
    assert params.train.model == "digits_cnn"
    assert params.convert.enabled_variants == list(VARIANTS)


def test_config_variant_names_are_the_variant_table():
    assert set(Params().convert.variants) == set(VARIANTS)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"train": {"epochs": "many"}}, "train.epochs: got 'many'"),
        ({"train": {"epochs": 0}}, "train.epochs: got 0"),
        ({"train": {"epoch": 3}}, "train.epoch: unknown key"),
        ({"trian": {}}, "trian: unknown key"),
        ({"data": {"val_fraction": 0.9}}, "data.val_fraction: got 0.9"),
        ({"data": {"source": "csv"}}, "data.source: got 'csv'"),
        ({"data": {"source": "npz"}}, "data.path is required"),
        ({"train": {"model": "keras_file"}}, "train.model_path is required"),
        ({"quantize": {"strategy": "sometimes"}}, "quantize.strategy: got 'sometimes'"),
        ({"prune": {"target_sparsities": [0.05]}}, "prune.target_sparsities value 0.05"),
        ({"convert": {"variants": {"tflite_int4": True}}}, "convert.variants.tflite_int4"),
        ({"evaluate": {"gates": {"max_host_latency_ms": -1}}}, "evaluate.gates.max_host_latency_ms: got -1"),
        ({"mlflow": {"registered_model": "has space"}}, "mlflow.registered_model: got 'has space'"),
        ({"convert": {"variants": dict.fromkeys(VARIANTS, False)}}, "every variant is switched off"),
    ],
)
def test_bad_params_name_key_and_value(raw, expected):
    with pytest.raises(ConfigError) as caught:
        parse_params(raw)
    assert expected in str(caught.value)


def test_non_mapping_and_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="must be a mapping"):
        parse_params([1, 2])  # type: ignore[arg-type]
    bad = tmp_path / "params.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "missing.yaml")


def test_params_hash_is_stable_and_sensitive(tmp_path):
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    first, second = parse_params(raw), parse_params(raw)
    assert first.params_hash() == second.params_hash()
    raw["seed"] = 7
    assert parse_params(raw).params_hash() != first.params_hash()
    raw["seed"], raw["evaluate"]["gates"]["max_host_latency_ms"] = first.seed, 99.0
    assert parse_params(raw).params_hash() == first.params_hash()  # gates shape no model


def test_flat_params_use_dotted_keys():
    flat = Params().flat()
    assert flat["train.epochs"] == "25"
    assert flat["evaluate.gates.max_accuracy_drop_pts"] == "1.0"
    assert flat["prune.target_sparsities"] == "[0.5, 0.7, 0.8, 0.9]"


def test_a_partial_variant_map_switches_off_only_what_it_names():
    params = parse_params({"convert": {"variants": {"onnx_int8": False}}})
    assert params.convert.enabled_variants == [name for name in VARIANTS if name != "onnx_int8"]


# ---- the environment's overrides: one table, applied once by load_params ---------------------------------------
ENVIRONMENT_VALUES = {"MLFLOW_TRACKING_URI": "http://mlflow.lan:5000", "EDGELOOP_REGISTRY": "registry.lan:5000",
                      "EDGELOOP_SIGNING_KEY": "/keys/release.key", "EDGELOOP_TRUSTED_KEYS": "/keys/trusted",
                      "EDGELOOP_BROKER": "broker.lan:1883", "EDGELOOP_DATA_SYNC": "pull",
                      "EDGELOOP_MAX_START_S": "12.5"}


def test_the_environment_table_names_every_variable_once_and_load_params_applies_it(monkeypatch):
    from tasks.config import ENVIRONMENT

    assert set(ENVIRONMENT) == set(ENVIRONMENT_VALUES)
    for variable, value in ENVIRONMENT_VALUES.items():
        monkeypatch.setenv(variable, value)
    params = load_params(REPO / "params.yaml")
    for variable, (section, field) in ENVIRONMENT.items():
        assert str(getattr(getattr(params, section), field)) == ENVIRONMENT_VALUES[variable], variable
    assert parse_params(yaml.safe_load((REPO / "params.yaml").read_text())).rollout.broker == "127.0.0.1:1883"


def test_an_empty_variable_leaves_params_yaml_in_charge(monkeypatch):
    for variable in ENVIRONMENT_VALUES:
        monkeypatch.setenv(variable, "")
    assert load_params(REPO / "params.yaml") == parse_params(yaml.safe_load((REPO / "params.yaml").read_text()))


@pytest.mark.parametrize(("variable", "value", "key"), [("EDGELOOP_BROKER", "broker.lan", "rollout.broker"),
                                                        ("EDGELOOP_REGISTRY", "no such/registry", "package.registry")])
def test_a_bad_variable_is_refused_naming_it(monkeypatch, variable, value, key):
    monkeypatch.setenv("EDGELOOP_SIGNING_KEY", "keys/elsewhere.key")  # a good one beside it is not blamed
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as caught:
        load_params(REPO / "params.yaml")
    assert f"invalid parameters in the environment ({variable})" in str(caught.value)
    assert f"{variable} ({key}): got {value!r}; String should match pattern" in str(caught.value)
