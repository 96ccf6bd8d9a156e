"""Weight clustering, the recipe's third technique (tfmot): after pruning, as the guide orders them.

Each clustered layer's kernel is reduced to at most ``clusters`` distinct values (centroids, fine-tuned), so the
file compresses far better; the cluster count is searched like the sparsity, from the most clusters (the most
conservative) down, keeping the fewest within the accuracy budget. Two int8 source models come out of it:

- the baseline clustered, then cluster-preserving QAT (CQAT): ``tflite_int8_clustered``;
- the pruned model clustered with its zeros kept (sparsity-preserving clustering), then sparsity- and
  cluster-preserving QAT (PCQAT): ``tflite_int8_pruned_clustered``.

With ``quantize.strategy: ptq`` the stripped clustered model is quantized after training instead. A layer tfmot
refuses, or a count larger than a layer's kernel, is reported by name and that variant is skipped; the other
variants still ship.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from tasks.config import ClusterParams, QuantizeParams
from tasks.contracts import ClusteringSummary, ClusterTrial, PrunedInt8
from tasks.model.keras_io import kernel_sparsity, tfmot
from tasks.model.optimize import FineTuning, TfmotRefused, copy_model, keras_accuracy, tfmot_refusals
from tasks.workspace import Workspace

log = logging.getLogger(__name__)


def _kernel(layer: Any) -> Any | None:
    """The weight tensor clustering reduces (a DepthwiseConv2D's is ``depthwise_kernel``); None without one."""
    kernel = getattr(layer, "kernel", None)
    return kernel if kernel is not None else getattr(layer, "depthwise_kernel", None)


def clustered_layers(model: Any, params: ClusterParams) -> list[Any]:
    """The layers of ``model`` whose type ``cluster.layers`` names (those with a kernel)."""
    return [layer for layer in model.layers if type(layer).__name__ in params.layers and _kernel(layer) is not None]


def _kernel_size(layer: Any) -> int:
    return int(_kernel(layer).shape.num_elements())


def check_counts_fit(model: Any, params: ClusterParams) -> None:
    """Raise :class:`TfmotRefused` naming the first layer a ``cluster.cluster_counts`` value does not fit."""
    layers = clustered_layers(model, params)
    if not layers:
        raise TfmotRefused(f"no layer of the types cluster.layers names ({', '.join(params.layers)}) in the model")
    for layer in layers:
        if max(params.cluster_counts) > _kernel_size(layer):
            raise TfmotRefused(f"cluster.cluster_counts value {max(params.cluster_counts)} does not fit layer "
                               f"{layer.name!r}: its kernel has {_kernel_size(layer)} weights")


def cluster_to(model: Any, clusters: int, params: ClusterParams, tuning: FineTuning, preserve_sparsity: bool) -> Any:
    """Fine-tune a copy of ``model`` with its selected layers clustered to ``clusters`` centroids; return it
    stripped (plain layers holding the clustered weights) and settled."""
    import tf_keras as keras

    mot = tfmot()
    init = getattr(mot.clustering.keras.CentroidInitialization, params.centroid_init.upper())
    selected = {layer.name for layer in clustered_layers(model, params)}

    def wrap(layer: Any) -> Any:
        if layer.name not in selected:
            return layer
        return mot.clustering.keras.cluster_weights(layer, number_of_clusters=clusters, cluster_centroids_init=init,
                                                    preserve_sparsity=preserve_sparsity)

    with tfmot_refusals():
        wrapped = keras.models.clone_model(copy_model(model), clone_function=wrap)
    tuning.fit(wrapped, params.learning_rate, params.epochs, f"clustering to {clusters}", settle=False)
    stripped = mot.clustering.keras.strip_clustering(wrapped)
    tuning.settle(stripped, f"clustering to {clusters}")
    return stripped


def search_clusters(model: Any, baseline_val: float, params: ClusterParams, tuning: FineTuning,
                    preserve_sparsity: bool) -> tuple[Any, int, list[ClusterTrial], bool]:
    """Step the cluster count down; keep the fewest whose val drop is within budget (else the most tried)."""
    check_counts_fit(model, params)
    kept, first, trials = None, None, []
    for clusters in sorted(params.cluster_counts, reverse=True):
        clustered = cluster_to(model, clusters, params, tuning, preserve_sparsity)
        first = first or (clustered, clusters)
        accuracy = keras_accuracy(clustered, tuning.val)
        trial = ClusterTrial(clusters=clusters, val_accuracy=accuracy, drop_pts=100.0 * (baseline_val - accuracy))
        trials.append(trial)
        log.info("clustering to %d: val accuracy %.4f (drop %.2f pts)", clusters, accuracy, trial.drop_pts)
        if trial.drop_pts > params.max_accuracy_drop_pts:
            break
        kept = (clustered, clusters)
    if kept is not None:
        return *kept, trials, True
    log.warning("no cluster count kept the val drop within cluster.max_accuracy_drop_pts (%.2f pts): the variant "
                "is built with the most clusters tried (%d), the gates judge it",
                params.max_accuracy_drop_pts, first[1])
    return *first, trials, False


def cluster_preserving_qat(clustered: Any, params: QuantizeParams, tuning: FineTuning, preserve_sparsity: bool) -> Any:
    """CQAT (PCQAT with ``preserve_sparsity``): QAT that keeps each layer's centroids (and zeros), stripped of the
    clustering variables so a plain QAT model is saved."""
    mot = tfmot()
    with tfmot_refusals():
        annotated = mot.quantization.keras.quantize_annotate_model(clustered)
        scheme = mot.experimental.combine.Default8BitClusterPreserveQuantizeScheme(preserve_sparsity)
        model = mot.quantization.keras.quantize_apply(annotated, scheme)
    step = "pcqat" if preserve_sparsity else "cqat"
    tuning.fit(model, params.qat_learning_rate, params.qat_epochs, step)
    return mot.experimental.combine.strip_clustering_cqat(model)


def run_clustering(model: Any | None, of: Literal["baseline", "pruned"], baseline_val: float, params: ClusterParams,
                   quantize: QuantizeParams, tuning: FineTuning, workspace: Workspace) -> ClusteringSummary:
    """One clustering search and its int8 source model (CQAT/PCQAT, or PTQ of the clustered model), saved as
    ``<of>_clustered[_qat].h5``; a refusal is the summary's error, never a crashed stage."""
    if model is None:
        return ClusteringSummary(of=of, error="pruning did not produce a model (prune.enabled, or its error)")
    preserve = of == "pruned"
    try:
        clustered, clusters, trials, within = search_clusters(model, baseline_val, params, tuning, preserve)
    except TfmotRefused as error:
        log.warning("clustering the %s model failed: %s", of, error)
        return ClusteringSummary(of=of, error=str(error))
    stripped_file = workspace.keras_model(f"{of}_clustered")
    clustered.save(stripped_file)
    summary = ClusteringSummary(of=of, trials=trials, within_budget=within, clusters=clusters,
                                sparsity=kernel_sparsity(clustered))
    if quantize.strategy == "ptq":
        return summary.model_copy(update={"int8": PrunedInt8(
            method="ptq", reason="strategy ptq: post-training quantization of the clustered model",
            file=stripped_file.name)})
    method = "pcqat" if preserve else "cqat"
    try:
        qat = cluster_preserving_qat(clustered, quantize, tuning, preserve)
    except TfmotRefused as error:  # layers it cannot quantize: PTQ of the clustered model instead
        log.warning("%s failed (%s); using post-training quantization of the clustered model", method, error)
        return summary.model_copy(update={"int8": PrunedInt8(
            method="ptq", reason=f"{method.upper()} failed ({error}); post-training quantization instead"[:500],
            file=stripped_file.name)})
    qat_file = workspace.keras_model(f"{of}_clustered_qat")
    qat.save(qat_file)
    reason = ("sparsity- and cluster-preserving QAT (PCQAT) keeps the zeros and the centroids through quantization"
              if preserve else "cluster-preserving QAT (CQAT) keeps the centroids through quantization")
    return summary.model_copy(update={"int8": PrunedInt8(method=method, reason=reason, file=qat_file.name)})
