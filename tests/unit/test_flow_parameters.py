"""The Run form: one source for every parameter (tasks.config), defaults from params.yaml, early errors."""


from pathlib import Path

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
    assert len(defaults.variants) == 12 and defaults.cluster is True


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


# ---- a run's overrides of a whole section: generated from the section, never a hand copy ---------------------
def _overridable():
    from flows.drift_check import DriftSettings, drift_check
    from flows.retrain import retrain
    from flows.rollout import RolloutPlan, rollout
    from tasks.config import DriftParams, RolloutParams

    # override model, the config section it stands for, and (flow, parameter) pairs that take it
    return {"rollout": (RolloutPlan, RolloutParams, [(rollout, "plan"), (retrain, "rollout_plan")]),
            "drift": (DriftSettings, DriftParams, [(drift_check, "settings")])}


def _optional_part(schema: dict, field: dict) -> dict:
    """A property schema ($refs inlined, no default/title) with its ``null`` alternative taken out."""
    resolved = _resolved(schema, field)
    if "anyOf" in resolved:
        branches = [branch for branch in resolved.pop("anyOf") if branch != {"type": "null"}]
        resolved = {**branches[0], **resolved} if len(branches) == 1 else {**resolved, "anyOf": branches}
    return resolved


@pytest.mark.parametrize("section", ["rollout", "drift"])
def test_override_forms_are_the_config_sections_with_every_field_optional(section):
    form_model, config_model, _ = _overridable()[section]
    form, config = form_model.model_json_schema(), config_model.model_json_schema()
    assert list(form["properties"]) == list(config["properties"])  # every field, in the config's order
    assert not form.get("required") and form_model().model_dump() == dict.fromkeys(config["properties"])
    for name, field in config["properties"].items():
        assert form["properties"][name]["default"] is None, name
        assert field.get("description"), f"{section}.{name} has no description for the Run form"
        assert _optional_part(form, form["properties"][name]) == _optional_part(config, field), name
    with pytest.raises(ValidationError, match="unknown_key"):
        form_model(unknown_key=1)


@pytest.mark.parametrize("section", ["rollout", "drift"])
def test_the_flows_take_the_typed_override_and_still_accept_a_dict(section):
    form_model, _, parameters = _overridable()[section]
    for flow_object, parameter in parameters:
        validated = flow_object.validate_parameters({parameter: {}})[parameter]
        assert isinstance(validated, form_model), f"{flow_object.name}.{parameter}"


def test_an_override_is_validated_with_the_config_bounds_naming_the_key():
    from flows.parameters import apply_override
    from flows.rollout import RolloutPlan
    from tasks.config import DriftParams, RolloutParams

    with pytest.raises(ValidationError, match="jitter_s\n.*less than or equal to 3600"):
        RolloutPlan(jitter_s=3601)
    with pytest.raises(ConfigError, match=r"the rollout plan:\n  - jitter_s: got 3601; .* less than or equal to 3600"):
        apply_override(RolloutParams(), {"jitter_s": 3601}, "the rollout plan")
    with pytest.raises(ConfigError, match="stages: got .*the last stage must be 100"):  # the section's validators
        apply_override(RolloutParams(), RolloutPlan(stages=[5, 50]), "the rollout plan")
    with pytest.raises(ConfigError, match="consecutive_windows: got 13"):
        apply_override(DriftParams(), {"consecutive_windows": 13}, "the drift check's settings")


def test_unset_override_fields_keep_params_yaml_and_the_environment_and_set_ones_win(monkeypatch):
    from flows.parameters import PARAMS_PATH, apply_override
    from flows.rollout import RolloutPlan
    from tasks.config import load_params

    monkeypatch.setenv("EDGELOOP_BROKER", "broker.lan:1883")
    base = load_params(PARAMS_PATH).rollout
    assert apply_override(base, None, "plan") == base == apply_override(base, RolloutPlan(), "plan")
    changed = apply_override(base, RolloutPlan.model_validate({"jitter_s": 2, "fleet_file": "demo/fleet.yaml"}), "plan")
    assert changed == base.model_copy(update={"jitter_s": 2.0, "fleet_file": Path("demo/fleet.yaml")})
    assert changed.broker == "broker.lan:1883"
    assert apply_override(base, RolloutPlan(broker="other.lan:1884"), "plan").broker == "other.lan:1884"
