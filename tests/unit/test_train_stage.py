import json

import pytest

from tasks.config import Params
from tasks.data import Dataset, PreparedData
from tasks.train import build_baseline, write_train_metrics
from tasks.zoo import ModelZooError


def _prepared(digits) -> PreparedData:
    small = Dataset(digits.x[:64], digits.y[:64], digits.labels)
    return PreparedData(small, small, small, small.x[:8], small)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_bring_your_own_keras_model_is_loaded_for_fine_tuning(tmp_path, tiny_model, digits, suffix):
    path = tmp_path / f"mine{suffix}"
    tiny_model.save(path)
    params = Params.model_validate({"train": {"model": "keras_file", "model_path": str(path)}})
    model = build_baseline(params, _prepared(digits))
    assert model.input_shape[1:] == (8, 8, 1) and model.output_shape[-1] == 10
    assert model.count_params() == tiny_model.count_params()


def test_corrupt_own_model_is_a_clear_error(tmp_path, digits):
    corrupt = tmp_path / "broken.h5"
    corrupt.write_bytes(b"\x89HDF\r\n garbage")
    params = Params.model_validate({"train": {"model": "keras_file", "model_path": str(corrupt)}})
    with pytest.raises(ModelZooError, match="broken.h5"):
        build_baseline(params, _prepared(digits))


def test_train_metrics_file_is_flat(tmp_path):
    summary = {"baseline": {"val_accuracy": 0.9, "test_accuracy": 0.8}, "ptq_check": {"drop_pts": 0.5},
               "qat": {"trained": False}, "pruning": None, "params_count": 10}
    write_train_metrics(summary, tmp_path / "m.json")
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["baseline_test_accuracy"] == 0.8 and metrics["pruned_sparsity"] is None
