import pytest

from flows.parameters import TrainingParameters, default_parameters, overrides, resolve, with_workspace
from tasks.config import ConfigError, Params
from tests.conftest import REPO_ROOT


def test_defaults_come_from_params_yaml():
    defaults = default_parameters()
    assert defaults.epochs == 25 and defaults.model == "digits_cnn"
    assert len(defaults.variants) == 8


def test_applied_parameters_override_params_yaml_and_are_validated():
    changed = TrainingParameters(**{**default_parameters().model_dump(), "epochs": 3, "variants": ["tflite_int8"],
                                    "strategy": "qat"})
    config = resolve(changed, params_file=REPO_ROOT / "params.yaml")
    assert config.train.epochs == 3 and config.quantize.strategy == "qat"
    assert config.convert.enabled_variants == ["tflite_int8"]
    assert overrides(changed) == {"epochs": 3, "variants": ["tflite_int8"], "strategy": "qat"}


def test_schema_errors_name_the_field():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="epochs"):
        TrainingParameters(**{**default_parameters().model_dump(), "epochs": 0})
    with pytest.raises(ValidationError, match="variants"):
        TrainingParameters(**{**default_parameters().model_dump(), "variants": ["tflite_int3"]})


def test_cross_field_rules_fail_at_resolve_with_the_params_key():
    keras_file = TrainingParameters(**{**default_parameters().model_dump(), "model": "keras_file"})
    with pytest.raises(ConfigError, match="train.model_path is required"):
        resolve(keras_file, params_file=REPO_ROOT / "params.yaml")


def test_workspace_rebases_every_output_path(tmp_path):
    config = with_workspace(Params(), str(tmp_path))
    for path in (config.data.output_dir, config.train.output_dir, config.train.metrics_file,
                 config.convert.output_dir, config.evaluate.output_dir, config.mlflow.registration_file,
                 config.mlflow.artifact_root):
        assert str(path).startswith(str(tmp_path))
    assert with_workspace(Params(), None) == Params()


def test_unknown_device_and_missing_model_file_fail_before_any_work(tmp_path):
    base = default_parameters().model_dump()
    with pytest.raises(ConfigError, match=r"params.devices: unknown device\(s\) \['rpi5'\]"):
        resolve(TrainingParameters(**{**base, "devices": ["rpi5"]}), params_file=REPO_ROOT / "params.yaml")
    missing = TrainingParameters(**{**base, "model": "keras_file", "model_path": str(tmp_path / "none.h5")})
    with pytest.raises(ConfigError, match="params.model_path: .* does not exist"):
        resolve(missing, params_file=REPO_ROOT / "params.yaml")


def test_sparsities_out_of_range_are_rejected_by_the_schema():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="target_sparsities"):
        TrainingParameters(**{**default_parameters().model_dump(), "target_sparsities": [1.5]})
