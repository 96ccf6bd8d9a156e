"""Promotion and challenger/champion scoring against a real MLflow store (local SQLite, no server)."""

import pytest

from edge.sidecar import write_sidecar
from tasks.config import EvaluateParams
from tasks.contracts import Dataset
from tasks.devices import load_devices
from tasks.errors import PromotionRefused
from tasks.evaluation.compare import compare, comparison_markdown, score_model
from tasks.release.promotion import ApprovalRecord, promote, version_by_alias
from tests.conftest import REPO_ROOT

NAME = "unit-model"


@pytest.fixture
def registry(tmp_path, tiny_model_files):
    """A registered model with two versions in a scratch SQLite MLflow store."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    experiment = client.create_experiment("unit", artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model(NAME)
    versions = []
    for variant in ("tflite_fp32", "tflite_int8"):
        with mlflow.start_run(experiment_id=experiment) as run:
            mlflow.log_artifact(str(tiny_model_files[variant]), f"models/{variant}")
        source = f"{run.info.artifact_uri}/models/{variant}"
        versions.append(client.create_model_version(NAME, source=source, run_id=run.info.run_id).version)
    yield [str(v) for v in versions]
    mlflow.set_tracking_uri(None)


def test_promotion_moves_champion_and_previous_with_audit_tags(registry):
    import mlflow

    first, second = registry
    promote(NAME, first, ApprovalRecord.from_decision(True, "alice", "first"))
    assert str(version_by_alias(NAME, "champion").version) == first
    assert version_by_alias(NAME, "previous") is None
    result = promote(NAME, second, ApprovalRecord.from_decision(True, "bob", "better"))
    assert result == {"registered_model": NAME, "champion": second, "previous": first, "approved_by": "bob"}
    assert str(version_by_alias(NAME, "previous").version) == first
    tags = mlflow.MlflowClient().get_model_version(NAME, second).tags
    assert tags["approved_by"] == "bob" and tags["approval_comment"] == "better" and tags["approved_at"]


@pytest.mark.parametrize(
    ("approval", "message"),
    [(None, "no approval record"), (ApprovalRecord(False, "carol", "no", "t"), "rejected by carol"),
     (ApprovalRecord(True, "", "", "t"), "names no reviewer")],
)
def test_promotion_refuses_without_an_approving_record(registry, approval, message):
    with pytest.raises(PromotionRefused, match=message):
        promote(NAME, registry[1], approval)
    assert version_by_alias(NAME, "champion") is None


def test_challenger_and_champion_scored_on_the_same_sets(tmp_path, tiny_model_files, digits):
    inventory = load_devices(REPO_ROOT / "devices.yaml")
    datasets = {"frozen test set": Dataset(digits.x[1000:1300], digits.y[1000:1300], digits.labels)}
    scores = []
    for role, variant in (("challenger", "tflite_int8"), ("champion", "tflite_fp32")):
        path = tmp_path / f"{variant}.tflite"
        path.write_bytes(tiny_model_files[variant].read_bytes())
        write_sidecar(path, {"variant": variant, "data_version": f"{role}.dir"})
        scores.append(score_model(role, "1" if role == "champion" else "2", path, datasets, inventory,
                                  EvaluateParams(latency_warmup_runs=2, latency_runs=10)))
    comparison = compare(*scores)
    delta = comparison["accuracy_delta_pts"]["frozen test set"]
    expected = 100 * (scores[0].accuracy["frozen test set"] - scores[1].accuracy["frozen test set"])
    assert delta == pytest.approx(expected)
    assert scores[0].size_bytes < scores[1].size_bytes
    assert set(scores[0].devices) == {d.name for d in inventory.devices}
    text = comparison_markdown(comparison, {"MLflow run": "http://mlflow/run"})
    assert "challenger (v2)" in text and "champion (v1)" in text and "new data version" in text
    first_only = comparison_markdown(compare(scores[0], None), {})
    assert "No champion yet" in first_only
