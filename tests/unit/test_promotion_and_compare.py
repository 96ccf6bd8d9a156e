"""Promotion and challenger/champion scoring against a real MLflow store (local SQLite, no server)."""

import numpy as np
import pytest

from edge.sidecar import write_sidecar
from tasks.config import EvaluateParams
from tasks.contracts import Dataset
from tasks.devices import load_devices
from tasks.errors import PromotionRefused
from tasks.evaluation.compare import (
    FROZEN_SET,
    LABELLED_SET,
    ModelScore,
    class_recall,
    compare,
    comparison_markdown,
    score_model,
)
from tasks.registry.promotion import ApprovalRecord, promote, version_by_alias
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
    comparison = compare(*scores, max_frozen_drop_pts=1.0)
    delta = comparison["accuracy_delta_pts"]["frozen test set"]
    expected = 100 * (scores[0].accuracy["frozen test set"] - scores[1].accuracy["frozen test set"])
    assert delta == pytest.approx(expected)
    assert scores[0].samples == {"frozen test set": 300}
    assert sum(scores[0].class_samples["frozen test set"].values()) == 300
    assert scores[0].size_bytes < scores[1].size_bytes
    assert set(scores[0].devices) == {d.name for d in inventory.devices}
    text = comparison_markdown(comparison, {"MLflow run": "http://mlflow/run"})
    assert "challenger (v2)" in text and "champion (v1)" in text and "new data version" in text
    first_only = compare(scores[0], None, max_frozen_drop_pts=1.0)
    assert first_only["frozen_regression"] == {"flagged": False, "drop_pts": 0.0, "max_drop_pts": 1.0}
    assert "No champion yet" in comparison_markdown(first_only, {})


def test_class_recall_on_a_hand_built_example():
    y_true = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    y_pred = np.array([0, 0, 0, 1, 1, 0, 2, 2, 2, 2])
    recall, counts = class_recall(y_true, y_pred, ["zero", "one", "two", "three"])
    assert recall == {"zero": 0.75, "one": 0.5, "two": 1.0}  # "three" has no samples: no figure, not 0
    assert counts == {"zero": 4, "one": 2, "two": 4}


def hand_score(role: str, frozen: float, per_class: dict[str, float], labelled: float = 0.9) -> ModelScore:
    return ModelScore(role, "2" if role == "challenger" else "1", "tflite_int8", "d.dir", 1000, 1.0,
                      accuracy={FROZEN_SET: frozen, LABELLED_SET: labelled},
                      samples={FROZEN_SET: 200, LABELLED_SET: 50},
                      per_class={FROZEN_SET: per_class}, class_samples={FROZEN_SET: {"cat": 100, "dog": 100}})


@pytest.mark.parametrize(("challenger", "flagged"), [
    (0.975, True),   # 1.5 points below the champion's 0.99: over a 1-point gate
    (0.980, False),  # exactly 1 point below: within
    (0.985, False),
    (0.995, False),  # better
])
def test_frozen_test_set_regression_is_flagged_only_over_the_gate(challenger, flagged):
    champion = hand_score("champion", 0.99, {"cat": 1.0, "dog": 0.98})
    comparison = compare(hand_score("challenger", challenger, {"cat": 1.0, "dog": 2 * challenger - 1.0}), champion,
                         max_frozen_drop_pts=1.0)
    regression = comparison["frozen_regression"]
    assert regression["flagged"] is flagged and regression["max_drop_pts"] == 1.0
    assert regression["drop_pts"] == pytest.approx(100 * (0.99 - challenger))
    assert comparison["per_class_delta_pts"][FROZEN_SET]["dog"] == pytest.approx(100 * (2 * challenger - 1.0 - 0.98))
    assert comparison["per_class_delta_pts"][FROZEN_SET]["cat"] == pytest.approx(0.0)
    text = comparison_markdown(comparison, {})
    assert ('<span style="color:red">**🔴 ⚠ Frozen test set regression' in text) is flagged
    assert "over the gate" in text if flagged else "within the gate" in text


def test_markdown_names_the_drop_the_gate_and_the_per_class_figures():
    comparison = compare(hand_score("challenger", 0.95, {"cat": 1.0, "dog": 0.9}),
                         hand_score("champion", 0.99, {"cat": 1.0, "dog": 0.98}), max_frozen_drop_pts=2.0,
                         sets={FROZEN_SET: "champion v1's test split (md5 abc)"}, notes=["a note for the reviewer"])
    text = comparison_markdown(comparison, {})
    flag = next(line for line in text.splitlines() if line.startswith('<span style="color:red">'))
    assert "4.00 points below the champion" in flag and "at most 2.00 points" in flag and flag.endswith("</span>")
    assert text.index(flag) < text.index("| variant |")  # on top, before the tables
    assert "| dog | 100 | 0.9000 | 0.9800 | -8.00 |" in text
    assert f"accuracy on {FROZEN_SET} (n=200)" in text
    assert "champion v1's test split (md5 abc)" in text and "a note for the reviewer" in text
