"""Weight clustering (tasks/model/cluster.py): the structure survives CQAT/PCQAT and int8 conversion, read back
from the converted file; counts that do not fit and layers tfmot refuses skip the variant with their name."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.config import ClusterParams, Params, QuantizeParams
from tasks.contracts import Dataset
from tasks.errors import ConfigError
from tasks.model import cluster, optimize
from tasks.model.exporters import tflite_bytes
from tasks.model.keras_io import kernel_sparsity, load_trained
from tasks.model.weight_structure import weight_structure
from tasks.workspace import Workspace

FAST = ClusterParams(cluster_counts=[8], epochs=1)
QAT = QuantizeParams(qat_epochs=1)


def _tuning(digits) -> optimize.FineTuning:
    return optimize.FineTuning(Dataset(digits.x[:400], digits.y[:400], digits.labels),
                               Dataset(digits.x[400:600], digits.y[400:600], digits.labels), batch_size=32)


def _distinct_per_kernel(model) -> list[int]:
    return [int(np.unique(weights).size) for weights in model.get_weights() if weights.ndim >= 2]


def _int8_file(model, digits, tmp_path, name: str):
    path = tmp_path / f"{name}.tflite"
    path.write_bytes(tflite_bytes(model, "int8", digits.x[:50]))
    return path


def test_cqat_keeps_the_clusters_through_int8_and_the_file_shows_them(tiny_model, digits, tmp_path):
    workspace = Workspace(tmp_path)
    workspace.keras_dir.mkdir(parents=True)
    baseline_val = optimize.keras_accuracy(tiny_model, _tuning(digits).val)
    summary = cluster.run_clustering(tiny_model, "baseline", baseline_val, FAST, QAT, _tuning(digits), workspace)
    assert summary.error == "" and summary.clusters == 8 and summary.int8.method == "cqat", summary
    assert [trial.clusters for trial in summary.trials] == [8]
    stripped = load_trained(workspace.keras_dir / "baseline_clustered.h5")
    assert max(_distinct_per_kernel(stripped)) <= 8  # every clustered kernel: at most 8 distinct values
    converted = weight_structure(_int8_file(load_trained(workspace.keras_dir / summary.int8.file), digits, tmp_path,
                                            "cqat"))
    assert converted["max_distinct_weights"] <= 9, converted["layers"]  # 8 centroids (+ a zero) per channel
    plain = weight_structure(_int8_file(tiny_model, digits, tmp_path, "plain"))
    assert plain["max_distinct_weights"] > 20  # what an unclustered int8 file holds: the check can fail


def test_pcqat_keeps_both_the_zeros_and_the_clusters(tiny_model, digits, tmp_path):
    from tasks.config import PruneParams

    workspace = Workspace(tmp_path)
    workspace.keras_dir.mkdir(parents=True)
    tuning = _tuning(digits)
    pruned = optimize.prune_to(optimize.copy_model(tiny_model), 0.7, PruneParams(epochs=2), tuning)
    sparsity = kernel_sparsity(pruned)
    summary = cluster.run_clustering(pruned, "pruned", 0.0, FAST.model_copy(update={"max_accuracy_drop_pts": 100}),
                                     QAT, tuning, workspace)
    assert summary.int8 is not None and summary.int8.method == "pcqat", summary
    assert summary.sparsity == pytest.approx(sparsity, abs=0.02)  # sparsity-preserving clustering kept the zeros
    converted = weight_structure(_int8_file(load_trained(workspace.keras_dir / summary.int8.file), digits, tmp_path,
                                            "pcqat"))
    assert converted["weight_sparsity"] >= sparsity - 0.05 and converted["max_distinct_weights"] <= 9


def test_the_search_keeps_the_fewest_clusters_within_budget_else_the_most(tiny_model, digits):
    tuning = _tuning(digits)
    baseline_val = optimize.keras_accuracy(tiny_model, tuning.val)
    params = ClusterParams(cluster_counts=[2, 16], epochs=1, max_accuracy_drop_pts=100.0)
    _, clusters, trials, within = cluster.search_clusters(tiny_model, baseline_val, params, tuning, False)
    assert (clusters, [t.clusters for t in trials], within) == (2, [16, 2], True)
    strict = params.model_copy(update={"max_accuracy_drop_pts": -100.0})  # nothing can meet it
    _, clusters, trials, within = cluster.search_clusters(tiny_model, baseline_val, strict, tuning, False)
    assert (clusters, [t.clusters for t in trials], within) == (16, [16], False)


def test_a_count_that_does_not_fit_a_layer_skips_the_variant_naming_the_layer(tiny_model, digits, tmp_path):
    workspace = Workspace(tmp_path)
    workspace.keras_dir.mkdir(parents=True)
    too_many = ClusterParams(cluster_counts=[128], epochs=1)  # the first Conv2D holds 3*3*1*8 = 72 weights
    summary = cluster.run_clustering(tiny_model, "baseline", 0.9, too_many, QAT, _tuning(digits), workspace)
    assert summary.int8 is None and "does not fit layer 'conv2d" in summary.error and "72 weights" in summary.error
    assert not list(workspace.keras_dir.iterdir())  # nothing half-written
    missing = cluster.run_clustering(None, "pruned", 0.9, FAST, QAT, _tuning(digits), workspace)
    assert missing.int8 is None and "pruning did not produce a model" in missing.error


def test_a_layer_tfmot_refuses_is_named(digits, tmp_path):
    from tests.unit.test_optimize import _model_with_custom_layer

    workspace = Workspace(tmp_path)
    workspace.keras_dir.mkdir(parents=True)
    summary = cluster.run_clustering(_model_with_custom_layer(), "baseline", 0.9, FAST, QAT, _tuning(digits),
                                     workspace)
    assert summary.int8 is None or summary.int8.method == "ptq"  # clustered, but CQAT fell back to PTQ
    if summary.int8 is None:
        assert "custom_swish" in summary.error or "Swish" in summary.error, summary.error
    else:
        assert "CQAT failed" in summary.int8.reason


@pytest.mark.parametrize("cluster_section, key", [
    ({"cluster_counts": [1]}, "cluster.cluster_counts.0"),
    ({"cluster_counts": [300]}, "cluster.cluster_counts.0"),
    ({"cluster_counts": []}, "cluster.cluster_counts"),
    ({"centroid_init": "kmeans"}, "cluster.centroid_init"),
    ({"layers": ["LSTM"]}, "cluster.layers.0"),
])
def test_bad_cluster_params_name_the_key(cluster_section, key):
    from tasks.config import parse_params

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        parse_params({"cluster": cluster_section})
    assert Params().cluster.cluster_counts == [32, 16, 8]


def test_the_searches_run_only_for_the_clustered_variants_asked_for(tmp_path):
    from tasks.model.train import run_clusterings

    workspace = Workspace(tmp_path)
    neither = Params.model_validate({"convert": {"variants": {"tflite_int8_clustered": False,
                                                              "tflite_int8_pruned_clustered": False}}})
    assert run_clusterings(neither, None, None, 0.9, None, workspace) == []
    assert run_clusterings(Params.model_validate({"cluster": {"enabled": False}}), None, None, 0.9, None,
                           workspace) == []
    only_pruned = Params.model_validate({"convert": {"variants": {"tflite_int8_clustered": False}}})
    summaries = run_clusterings(only_pruned, None, None, 0.9, None, workspace)  # pruning off: nothing to cluster
    assert [summary.of for summary in summaries] == ["pruned"] and "pruning did not produce" in summaries[0].error
