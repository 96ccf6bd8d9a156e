from pathlib import Path

import numpy as np

from tasks.config import ConvertParams
from tasks.contracts import Dataset, PreparedData, TrainSummary, Workspace
from tasks.model.convert import SourceModel, convert_variant, resolve_sources
from tasks.variants import VARIANTS

LINEAGE = {"labels": ["0"], "data_version": "x.dir", "git_commit": "c", "params_hash": "h", "created_at": "t",
           "zoo_model": "digits_cnn"}


def _workspace(tmp_path: Path) -> Workspace:
    workspace = Workspace(tmp_path)
    workspace.variants_dir.mkdir(parents=True)
    return workspace


def _prepared(digits) -> PreparedData:
    small = Dataset(digits.x[:20], digits.y[:20], digits.labels)
    return PreparedData(small, small, small, small.x[:10])


def test_variant_that_fails_is_a_row_and_leaves_no_file(tmp_path, digits):
    corrupt = tmp_path / "baseline.h5"
    corrupt.write_bytes(b"not hdf5")
    workspace = _workspace(tmp_path)
    result = convert_variant(VARIANTS["tflite_fp32"], SourceModel(corrupt, "post-training"), ConvertParams(),
                             _prepared(digits), workspace, LINEAGE, {}, {})
    assert result.status == "failed" and result.error
    assert not workspace.variant_file("tflite_fp32").exists()
    assert not list(workspace.variants_dir.glob(".*partial"))


def test_variant_without_source_is_skipped_with_reason(tmp_path, digits):
    result = convert_variant(VARIANTS["tflite_int8_qat"], SourceModel(None, "", "no QAT model: strategy ptq"),
                             ConvertParams(), _prepared(digits), _workspace(tmp_path), LINEAGE, {}, {})
    assert result.status == "skipped" and "strategy ptq" in result.error


def test_converted_variant_gets_a_complete_sidecar(tmp_path, digits, tiny_model):
    import json

    loaded = {tmp_path / "baseline.h5": tiny_model}
    workspace = _workspace(tmp_path)
    result = convert_variant(VARIANTS["tflite_int8"], SourceModel(tmp_path / "baseline.h5", "post-training"),
                             ConvertParams(), _prepared(digits), workspace, LINEAGE, loaded, {})
    assert result.status == "ok", result.error
    sidecar = json.loads((workspace.variants_dir / "tflite_int8.tflite.json").read_text())
    for key in ("variant", "input", "output", "labels", "data_version", "git_commit", "params_hash", "created_at",
                "sha256", "sparsity", "size_bytes"):
        assert key in sidecar, key
    assert sidecar["input"]["dtype"] == "int8" and sidecar["input"]["scale"] > 0
    assert np.isclose(sidecar["sparsity"], 0.0, atol=0.01)


def _summary(**changes) -> TrainSummary:
    raw = {"model": "digits_cnn", "params_count": 10, "input_shape": [8, 8, 1], "labels": ["0", "1"],
           "quality": {"val_accuracy": 0.9, "majority_rate": 0.5, "floor": 0.6},
           "baseline": {"file": "baseline.h5", "val_accuracy": 0.9, "test_accuracy": 0.9},
           "ptq_check": {"val_accuracy": 0.9, "drop_pts": 0.0}, "qat": {"reason": "strategy ptq"},
           "pruning": {"sparsity": 0.8, "file": "pruned.h5",
                       "int8": {"method": "pqat", "reason": "r", "file": "pruned_qat.h5"}}}
    return TrainSummary.model_validate({**raw, **changes})


def test_resolve_sources_follows_the_train_summary(tmp_path):
    workspace = Workspace(tmp_path)
    sources = resolve_sources(_summary(), workspace)
    assert sources["baseline"].path == workspace.keras_dir / "baseline.h5"
    assert sources["qat"].path is None and "strategy ptq" in sources["qat"].reason
    assert sources["pruned_int8"].path == workspace.keras_dir / "pruned_qat.h5"
    assert "80%" in sources["pruned_int8"].method
    assert "pruning disabled" in resolve_sources(_summary(pruning=None), workspace)["pruned_int8"].reason
    failed = _summary(pruning={"error": "ValueError: can only prune ..."})
    assert "pruning failed: ValueError" in resolve_sources(failed, workspace)["pruned_int8"].reason


def test_clustered_sources_follow_the_train_summary(tmp_path):
    workspace = Workspace(tmp_path)
    assert "clustering not run" in resolve_sources(_summary(), workspace)["clustered_int8"].reason
    summary = _summary(clustering=[
        {"of": "baseline", "clusters": 8, "sparsity": 0.0, "int8": {"method": "cqat", "reason": "r",
                                                                     "file": "baseline_clustered_qat.h5"}},
        {"of": "pruned", "error": "cluster.cluster_counts value 128 does not fit layer 'conv2d': its kernel has 72 "
                                  "weights"}])
    sources = resolve_sources(summary, workspace)
    assert sources["clustered_int8"].path == workspace.keras_dir / "baseline_clustered_qat.h5"
    assert sources["clustered_int8"].method == "cqat at 8 clusters"
    assert sources["pruned_clustered_int8"].path is None
    assert "clustering failed: cluster.cluster_counts value 128 does not fit layer 'conv2d'" in sources[
        "pruned_clustered_int8"].reason


def test_the_sidecar_carries_the_weight_structure_read_from_the_file(tmp_path, digits, tiny_model):
    import json

    workspace = _workspace(tmp_path)
    result = convert_variant(VARIANTS["tflite_int8"], SourceModel(tmp_path / "baseline.h5", "post-training"),
                             ConvertParams(), _prepared(digits), workspace, LINEAGE, {tmp_path / "baseline.h5":
                                                                                      tiny_model}, {})
    assert result.status == "ok", result.error
    structure = json.loads((workspace.variants_dir / "tflite_int8.tflite.json").read_text())["weight_structure"]
    assert [layer["shape"] for layer in structure["layers"]] and structure["max_distinct_weights"] > 20
    assert all(layer["distinct_values"] <= 256 for layer in structure["layers"])
