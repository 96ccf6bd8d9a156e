"""The Run form: one source for every parameter (tasks.config), defaults from params.yaml, early errors."""


import pytest
from pydantic import ValidationError

from flows.parameters import FLOW_WORKSPACE, REPO_ROOT, TrainingParameters, default_parameters, overrides, resolve
from tasks.config import Params
from tasks.contracts import Workspace
from tasks.devices import load_devices
from tasks.errors import ConfigError

# form field -> the config field it stands for (section, key); None: the top-level key
SHARED_FIELDS = {"model": ("train", "model"), "model_path": ("train", "model_path"), "epochs": ("train", "epochs"),
                 "seed": (None, "seed"), "strategy": ("quantize", "strategy"), "prune": ("prune", "enabled"),
                 "target_sparsities": ("prune", "target_sparsities"), "gates": ("evaluate", "gates"),
                 "recommend_by": ("evaluate", "recommend_by")}
SCHEMA_NOISE = ("default", "title")


def _resolved(schema: dict, field: dict) -> dict:
    """A property schema with $refs inlined and without default/title (they legitimately differ)."""

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                definition = schema["$defs"][node["$ref"].split("/")[-1]]
                node = {**definition, **{key: value for key, value in node.items() if key != "$ref"}}
            return {key: inline(value) for key, value in node.items() if key not in SCHEMA_NOISE}
        return [inline(item) for item in node] if isinstance(node, list) else node

    return inline(field)


def _config_field(section: str | None, key: str) -> dict:
    schema = Params.model_json_schema()
    if section is None:
        return _resolved(schema, schema["properties"][key])
    section_schema = schema["$defs"][schema["properties"][section]["$ref"].split("/")[-1]]
    return _resolved(schema, section_schema["properties"][key])


@pytest.mark.parametrize("field", list(SHARED_FIELDS))
def test_form_fields_are_the_config_fields(field):
    form = TrainingParameters.model_json_schema()
    assert _resolved(form, form["properties"][field]) == _config_field(*SHARED_FIELDS[field])


def test_form_offers_devices_yaml_names_as_choices():
    form = TrainingParameters.model_json_schema()
    choices = form["properties"]["devices"]["items"]["enum"]
    assert choices == [device.name for device in load_devices(REPO_ROOT / "devices.yaml").devices]
    with pytest.raises(ValidationError, match="devices"):
        TrainingParameters(**{**default_parameters().model_dump(), "devices": ["rpi5"]})


def test_defaults_come_from_params_yaml():
    defaults = default_parameters()
    assert defaults.epochs == 25 and defaults.model == "digits_cnn"
    assert len(defaults.variants) == 8


def test_applied_parameters_override_params_yaml_and_are_validated(tmp_path):
    changed = TrainingParameters(**{**default_parameters().model_dump(), "epochs": 3, "variants": ["tflite_int8"],
                                    "strategy": "qat"})
    config, workspace = resolve(changed, str(tmp_path))
    assert config.train.epochs == 3 and config.quantize.strategy == "qat"
    assert config.convert.enabled_variants == ["tflite_int8"]
    assert workspace == Workspace(tmp_path)
    assert resolve(changed)[1] == Workspace(FLOW_WORKSPACE)
    assert FLOW_WORKSPACE != REPO_ROOT, "flow runs must not write into the checkout's root"
    assert overrides(changed) == {"epochs": 3, "variants": ["tflite_int8"], "strategy": "qat"}


def test_schema_errors_name_the_field():
    with pytest.raises(ValidationError, match="epochs"):
        TrainingParameters(**{**default_parameters().model_dump(), "epochs": 0})
    with pytest.raises(ValidationError, match="variants"):
        TrainingParameters(**{**default_parameters().model_dump(), "variants": ["tflite_int3"]})
    with pytest.raises(ValidationError, match="strategy"):
        TrainingParameters(**{**default_parameters().model_dump(), "strategy": "all"})


def test_cross_field_rules_fail_at_resolve_with_the_params_key():
    keras_file = TrainingParameters(**{**default_parameters().model_dump(), "model": "keras_file"})
    with pytest.raises(ConfigError, match="train.model_path is required"):
        resolve(keras_file)


def test_missing_model_file_fails_before_any_work(tmp_path):
    base = default_parameters().model_dump()
    missing = TrainingParameters(**{**base, "model": "keras_file", "model_path": str(tmp_path / "none.h5")})
    with pytest.raises(ConfigError, match="params.model_path: .* does not exist"):
        resolve(missing)


def test_sparsities_out_of_range_are_rejected_by_the_schema():
    with pytest.raises(ValidationError, match="target_sparsities"):
        TrainingParameters(**{**default_parameters().model_dump(), "target_sparsities": [1.5]})
