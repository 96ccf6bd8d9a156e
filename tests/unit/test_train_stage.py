import json

import pytest

from tasks.config import Params
from tasks.contracts import Dataset, PreparedData, TrainSummary, Workspace, write_train_summary
from tasks.errors import ModelZooError
from tasks.model.train import build_baseline


def _prepared(digits) -> PreparedData:
    small = Dataset(digits.x[:64], digits.y[:64], digits.labels)
    return PreparedData(small, small, small, small.x[:8])


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_bring_your_own_keras_model_is_loaded_for_fine_tuning(tmp_path, tiny_model, digits, suffix):
    path = tmp_path / f"mine{suffix}"
    tiny_model.save(path)
    params = Params.model_validate({"train": {"model": "keras_file", "model_path": str(path)}})
    model = build_baseline(params.train, _prepared(digits))
    assert model.input_shape[1:] == (8, 8, 1) and model.output_shape[-1] == 10
    assert model.count_params() == tiny_model.count_params()


def test_corrupt_own_model_is_a_clear_error(tmp_path, digits):
    corrupt = tmp_path / "broken.h5"
    corrupt.write_bytes(b"\x89HDF\r\n garbage")
    params = Params.model_validate({"train": {"model": "keras_file", "model_path": str(corrupt)}})
    with pytest.raises(ModelZooError, match="broken.h5"):
        build_baseline(params.train, _prepared(digits))


def test_train_metrics_file_is_flat(tmp_path):
    summary = TrainSummary.model_validate({
        "model": "digits_cnn", "params_count": 10, "input_shape": [8, 8, 1], "labels": ["0", "1"],
        "quality": {"val_accuracy": 0.9, "majority_rate": 0.5, "floor": 0.6},
        "baseline": {"file": "baseline.h5", "val_accuracy": 0.9, "test_accuracy": 0.8},
        "ptq_check": {"val_accuracy": 0.85, "drop_pts": 0.5}, "qat": {"reason": "strategy ptq"}, "pruning": None})
    workspace = Workspace(tmp_path)
    workspace.keras_dir.mkdir(parents=True)
    write_train_summary(workspace, summary)
    metrics = json.loads(workspace.train_metrics_file.read_text())
    assert metrics["baseline_test_accuracy"] == 0.8 and metrics["pruned_sparsity"] is None
