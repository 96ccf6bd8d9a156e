"""The register stage logs a drift reference and a frozen test set with every version; the approval
comparison scores challenger and champion on the champion's frozen test set. Real local SQLite MLflow.
"""

from __future__ import annotations

import numpy as np
import pytest

from edge.features import features
from edge.runtime import EdgeModel
from tasks.config import Params
from tasks.contracts import (
    Registration,
    Workspace,
)
from tasks.errors import StageError
from tasks.evaluation.compare import CURRENT_SET, FROZEN_SET
from tasks.lineage import file_md5
from tasks.monitoring.reference import read_reference
from tasks.registry import promotion
from tasks.registry.challenge import compare_with_champion, evaluation_sets
from tasks.registry.register import register
from tests.conftest import REPO_ROOT
from tests.registry_helpers import NEWER_TEST, TEST, TRAIN, prepare_run, split


@pytest.fixture
def store(tmp_path, monkeypatch):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow's own client calls in these tests
    yield Params.model_validate({"drift": {"reference_rows": 100}, "retrain": {"labelled_dir": str(tmp_path / "none")},
                                 "mlflow": {"tracking_uri": uri},
                                 "evaluate": {"latency_warmup_runs": 1, "latency_runs": 5}})
    mlflow.set_tracking_uri(None)


def test_registration_logs_the_drift_reference_and_the_frozen_test_set(store, tmp_path, digits, tiny_model_files):
    import mlflow

    workspace = Workspace(tmp_path / "run")
    registration = register(store, workspace, *prepare_run(workspace, digits, tiny_model_files["tflite_int8"],
                                                           "tflite_int8", TEST))
    name = registration.registered_model
    version, path = promotion.download_drift_reference(name, "candidate", tmp_path / "reference")
    assert version == registration.version
    reference = read_reference(path)
    rows = np.sort(np.random.default_rng(store.seed).choice(1000, size=100, replace=False))
    # float32 features: a dot product over a sample's 64 values may be summed in another order on another CPU
    # or BLAS kernel (AVX2, AVX-512), moving it by up to ~64 x 6e-8 = 4e-6 relative; 1e-5 holds for any order,
    # and 1e-6 absolute covers features near 0 (pixels in [0, 1]). Any two distinct rows differ by >= 0.015.
    np.testing.assert_allclose(reference.features, features(digits.x[TRAIN][rows]), rtol=1e-5, atol=1e-6)
    outputs = EdgeModel.load(tiny_model_files["tflite_int8"]).predict(digits.x[TRAIN][rows])
    np.testing.assert_array_equal(reference.predicted, outputs.argmax(axis=1))
    assert promotion.download_drift_reference(name, "champion", tmp_path / "none") is None

    model_version = mlflow.MlflowClient().get_model_version(name, registration.version)
    assert model_version.tags[promotion.FROZEN_TEST_SET_TAG] == file_md5(workspace.split_file("test"))
    frozen = promotion.download_frozen_test_set(model_version, tmp_path / "frozen")
    assert frozen.data_version == registration.data_version and frozen.labels == digits.labels
    np.testing.assert_array_equal(frozen.dataset().y, digits.y[TEST])
    np.testing.assert_array_equal(frozen.dataset().x, digits.x[TEST])


def _corrupt_train_split(workspace, monkeypatch):
    workspace.split_file("train").write_bytes(b"not an npz")


def _full_disk(workspace, monkeypatch):
    def write_reference(path, reference):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("tasks.registry.register.write_reference", write_reference)


@pytest.mark.parametrize(("fault", "message"), [
    (_corrupt_train_split, "train.npz is unreadable"),
    (_full_disk, r"drift reference or frozen test set of tflite_int8 could not be written or logged \(OSError: "
                 r".*No space left on device\); nothing was registered"),
])
def test_a_reference_that_cannot_be_built_or_logged_registers_nothing(store, tmp_path, digits, tiny_model_files,
                                                                       monkeypatch, fault, message):
    import mlflow

    workspace = Workspace(tmp_path / "run")
    evaluation, summary = prepare_run(workspace, digits, tiny_model_files["tflite_int8"], "tflite_int8", TEST)
    fault(workspace, monkeypatch)
    with pytest.raises(StageError, match=message):
        register(store, workspace, evaluation, summary)
    client = mlflow.MlflowClient()
    assert client.search_model_versions(f"name = '{store.mlflow.registered_model}'") == []
    runs = client.search_runs([client.get_experiment_by_name(store.mlflow.experiment).experiment_id])
    assert [run.info.status for run in runs] == ["FAILED"]
    assert not workspace.registration_file.exists()


def test_a_version_without_a_reference_or_frozen_set_is_named(store, tmp_path, digits, tiny_model_files):
    """Versions registered before this feature: a clear error for the reference, a noted fallback for the set."""
    import mlflow

    client = mlflow.MlflowClient()
    client.create_registered_model("legacy")
    experiment = client.create_experiment("legacy", artifact_location=(tmp_path / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifact(str(tiny_model_files["tflite_fp32"]), "models/tflite_fp32")
    version = client.create_model_version("legacy", f"{run.info.artifact_uri}/models/tflite_fp32",
                                          run_id=run.info.run_id)
    client.set_registered_model_alias("legacy", "champion", version.version)
    with pytest.raises(StageError, match="registered before drift references existed; re-register or set "
                                         "drift.reference to a file"):
        promotion.download_drift_reference("legacy", "champion", tmp_path / "reference")

    workspace = Workspace(tmp_path / "run")
    prepare_run(workspace, digits, tiny_model_files["tflite_int8"], "tflite_int8", TEST)
    registration = Registration(run_id="r", experiment_id=experiment, tracking_uri="", registered_model="legacy",
                                version="2", alias="candidate", variant="tflite_int8", data_version="d.dir",
                                model_uri="models:/legacy/2")
    datasets, sets, notes = evaluation_sets(workspace, split(digits, TEST), registration,
                                            client.get_model_version("legacy", version.version), tmp_path / "w")
    assert list(datasets) == [FROZEN_SET] and len(datasets[FROZEN_SET].y) == 300
    assert "registered before frozen test sets existed" in notes[0]


def test_challenger_is_scored_on_the_champions_frozen_test_set(store, tmp_path, digits, tiny_model_files):
    workspace = Workspace(tmp_path / "run")
    first = register(store, workspace, *prepare_run(workspace, digits, tiny_model_files["tflite_fp32"],
                                                    "tflite_fp32", TEST))
    promotion.promote(first.registered_model, first.version,
                      promotion.ApprovalRecord.from_decision(True, "alice", "first"))
    second = register(store, workspace, *prepare_run(workspace, digits, tiny_model_files["tflite_int8"],
                                                     "tflite_int8", NEWER_TEST))
    comparison = compare_with_champion(store, workspace, second, REPO_ROOT / "devices.yaml")

    challenger, champion = comparison["challenger"], comparison["champion"]
    assert list(challenger["accuracy"]) == [FROZEN_SET, CURRENT_SET] == list(champion["accuracy"])
    assert challenger["samples"] == {FROZEN_SET: 300, CURRENT_SET: 397}
    assert f"champion v{first.version}" in comparison["sets"][FROZEN_SET]
    frozen_outputs = EdgeModel.load(tiny_model_files["tflite_int8"]).predict(digits.x[TEST]).argmax(axis=1)
    assert challenger["accuracy"][FROZEN_SET] == pytest.approx(np.mean(frozen_outputs == digits.y[TEST]))
    expected_drop = 100 * (champion["accuracy"][FROZEN_SET] - challenger["accuracy"][FROZEN_SET])
    assert comparison["frozen_regression"]["drop_pts"] == pytest.approx(expected_drop)
    assert comparison["frozen_regression"]["max_drop_pts"] == store.retrain.max_frozen_drop_pts
    assert set(comparison["per_class_delta_pts"][FROZEN_SET]) == set(digits.labels)
