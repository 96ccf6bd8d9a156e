"""The ``train`` stage: float32 baseline, then PTQ check, QAT, pruning and PQAT, clustering and CQAT/PCQAT as the
recipe asks.

Writes the Keras models (``baseline.h5`` and, as needed, ``qat.h5``, ``pruned.h5``, ``pruned_qat.h5``,
``baseline_clustered[_qat].h5``, ``pruned_clustered[_qat].h5``),
the float32 test-set probabilities (the yardstick of every variant) and a :class:`TrainSummary` of
every decision the recipe made, all where :class:`tasks.contracts.Workspace` says.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Params, PruneParams, QuantizeParams, TrainParams
from tasks.contracts import (
    BaselineSummary,
    ClusteringSummary,
    PreparedData,
    PrunedInt8,
    PruningSummary,
    PtqCheck,
    QatSummary,
    QualityFloor,
    TrainSummary,
    Workspace,
    clear_stage_outputs,
    read_prepared,
    write_reference_outputs,
    write_train_summary,
)
from tasks.entrypoint import run_stage, stage_arguments
from tasks.errors import QualityFloorError
from tasks.model import cluster, heads, optimize
from tasks.model.keras_io import kernel_sparsity, load_trained
from tasks.model.tfsetup import set_seeds

log = logging.getLogger(__name__)


def build_baseline(params: TrainParams, prepared: PreparedData) -> Any:
    """The untrained (or pretrained, for ``keras_file``) float32 model for this data."""
    from tasks.model import zoo  # imports TensorFlow: only when a model is built (keeps --help instant)

    input_shape, num_classes = prepared.train.input_shape, len(prepared.train.labels)
    if params.model == "keras_file":
        loaded = zoo.load_keras_model(Path(params.model_path))
        return zoo.adapt_model(loaded, input_shape, num_classes)
    return zoo.build_model(params.model, input_shape, num_classes)


def fine_tuning(params: TrainParams, prepared: PreparedData, output: heads.OutputKind) -> optimize.FineTuning:
    return optimize.FineTuning(prepared.train, prepared.val, params.batch_size, output, params.batchnorm_max_gap_pts)


def train_baseline(params: TrainParams, prepared: PreparedData) -> tuple[Any, optimize.FineTuning]:
    """Build the model, read what its head emits, train it with the matching loss and settle its BatchNorm."""
    model = build_baseline(params, prepared)
    tuning = fine_tuning(params, prepared, heads.output_kind(model))
    tuning.fit(model, params.learning_rate, params.epochs, "baseline")
    return model, tuning


def quality_floor(params: TrainParams, val_accuracy: float, labels: np.ndarray, num_classes: int) -> QualityFloor:
    majority_rate = float(np.bincount(labels, minlength=num_classes).max() / len(labels))
    floor = majority_rate + params.min_gain_over_chance * (1.0 - majority_rate)
    return QualityFloor(val_accuracy=val_accuracy, majority_rate=majority_rate, floor=floor)


def check_learned(params: TrainParams, quality: QualityFloor, model: Any, tuning: optimize.FineTuning) -> None:
    """Stop the stage (before QAT and pruning spend time) when the baseline did not beat chance by the margin."""
    if quality.val_accuracy >= quality.floor:
        return
    train_accuracy = optimize.keras_accuracy(model, tuning.train)
    batchnorm = tuning.batchnorm_checks[0] if tuning.batchnorm_checks else None
    bn_text = ("no BatchNorm layers" if batchnorm is None else
               f"inference mode {batchnorm.inference_accuracy:.3f} vs training mode "
               f"{batchnorm.training_mode_accuracy:.3f}"
               + (f", statistics re-estimated: {batchnorm.inference_accuracy_after:.3f}" if batchnorm.reestimated
                  else ", no re-estimation needed"))
    fit_text = ("it fits the training set but not validation: are the labels or splits right?"
                if train_accuracy > quality.floor else "it does not fit even the training set")
    raise QualityFloorError(
        f"the float32 baseline did not learn: validation accuracy {quality.val_accuracy:.3f} is below the floor "
        f"{quality.floor:.3f} (majority-class rate {quality.majority_rate:.3f} + train.min_gain_over_chance "
        f"{params.min_gain_over_chance} of the rest); nothing is optimised or registered. Checked:\n"
        f"  - output activation: the head emits {tuning.output}, trained with "
        f"{'from_logits=True' if tuning.output == 'logits' else 'cross-entropy on probabilities'}\n"
        f"  - BatchNorm statistics: {bn_text}\n"
        f"  - training accuracy {train_accuracy:.3f}: {fit_text}\n"
        f"  - train.learning_rate {params.learning_rate}, train.epochs {params.epochs}: try more "
        "epochs or a learning rate 10x smaller or larger\n"
        "  - the labels: are y and the images paired correctly (data.path)?")


def needs_qat(strategy: str, ptq_drop_pts: float, max_drop_pts: float) -> tuple[bool, str]:
    """Whether the recipe calls for QAT, and why (recorded in the summary)."""
    if strategy == "qat":
        return True, "strategy qat"
    if strategy == "ptq":
        return False, "strategy ptq"
    if ptq_drop_pts > max_drop_pts:
        return True, f"PTQ drop {ptq_drop_pts:.2f} pts > {max_drop_pts} pts"
    return False, f"PTQ drop {ptq_drop_pts:.2f} pts <= {max_drop_pts} pts; QAT not needed"


def run_qat(model: Any, params: QuantizeParams, tuning: optimize.FineTuning) -> optimize.QatOutcome:
    outcome = optimize.quantize_aware(optimize.copy_model(model))
    if outcome.model is not None:
        tuning.fit(outcome.model, params.qat_learning_rate, params.qat_epochs, "qat")
    return outcome


def pruned_int8_method(strategy: str) -> tuple[bool, str]:
    """The pruned + int8 variant uses pruning-preserving QAT unless the strategy rules out training."""
    if strategy == "ptq":
        return False, "strategy ptq: post-training quantization of the pruned model"
    return True, f"strategy {strategy}: pruning-preserving QAT (PQAT) keeps the zeros through quantization"


def run_pruning(model: Any, baseline_val: float, prune: PruneParams, quantize: QuantizeParams,
                tuning: optimize.FineTuning, workspace: Workspace) -> PruningSummary:
    """Sparsity search, then PQAT (or PTQ) for the pruned + int8 variant; saves the models it keeps.

    A model tfmot cannot prune is reported, not a crashed stage: the pruned variant is then skipped.
    """
    try:
        pruned, trials, within_budget = optimize.search_sparsity(model, baseline_val, prune, tuning)
    except optimize.TfmotRefused as error:
        log.warning("pruning failed: %s", error)
        return PruningSummary(error=str(error), unsupported_layers=optimize.unsupported_layers(model, "prune"))
    pruned.save(workspace.keras_model("pruned"))
    use_pqat, reason = pruned_int8_method(quantize.strategy)
    source, method = workspace.keras_model("pruned").name, "ptq"
    if use_pqat:
        try:
            pqat = optimize.prune_preserving_qat(pruned, quantize, tuning)
            pqat.save(workspace.keras_model("pruned_qat"))
            source, method = workspace.keras_model("pruned_qat").name, "pqat"
        except optimize.TfmotRefused as error:  # layers PQAT cannot quantize: PTQ of the pruned model instead
            log.warning("PQAT failed (%s); using post-training quantization of the pruned model", error)
            reason = f"PQAT failed ({error}); post-training quantization instead"[:500]
    return PruningSummary(trials=trials, within_budget=within_budget, sparsity=kernel_sparsity(pruned),
                          file=workspace.keras_model("pruned").name,
                          int8=PrunedInt8(method=method, reason=reason, file=source))


def check_qat(model: Any, baseline_val: float, params: QuantizeParams, prepared: PreparedData,
              tuning: optimize.FineTuning, workspace: Workspace) -> tuple[PtqCheck, QatSummary]:
    """Measure full-integer PTQ in LiteRT; train QAT when the strategy (or the drop) asks for it."""
    ptq_val = optimize.ptq_accuracy(model, tuning.output, prepared.representative, prepared.val)
    ptq = PtqCheck(val_accuracy=ptq_val, drop_pts=100.0 * (baseline_val - ptq_val))
    want_qat, reason = needs_qat(params.strategy, ptq.drop_pts, params.max_ptq_drop_pts)
    if not want_qat:
        return ptq, QatSummary(reason=reason, unsupported_layers=optimize.unsupported_layers(model, "quantize"))
    outcome = run_qat(model, params, tuning)
    qat = QatSummary(reason=reason, mode=outcome.mode, unsupported_layers=outcome.unsupported_layers,
                     error=outcome.error)
    if outcome.model is not None:
        outcome.model.save(workspace.keras_model("qat"))
        qat = qat.model_copy(update={"trained": True, "file": workspace.keras_model("qat").name,
                                     "val_accuracy": optimize.keras_accuracy(outcome.model, prepared.val)})
    return ptq, qat


def run_clusterings(params: Params, model: Any, pruning: PruningSummary | None, baseline_val: float,
                    tuning: optimize.FineTuning, workspace: Workspace) -> list[ClusteringSummary]:
    """The clustering searches whose variants are asked for (``convert.variants``): of the baseline, and of the
    pruned model with its zeros kept."""
    wanted = set(params.convert.enabled_variants)
    summaries = []
    if not params.cluster.enabled:
        return summaries
    if "tflite_int8_clustered" in wanted:
        summaries.append(cluster.run_clustering(model, "baseline", baseline_val, params.cluster, params.quantize,
                                                tuning, workspace))
    if "tflite_int8_pruned_clustered" in wanted:
        pruned = load_trained(workspace.keras_dir / pruning.file) if pruning is not None and pruning.file else None
        summaries.append(cluster.run_clustering(pruned, "pruned", baseline_val, params.cluster, params.quantize,
                                                tuning, workspace))
    return summaries


def train(params: Params, prepared: PreparedData, workspace: Workspace) -> TrainSummary:
    """Run the whole stage and return the summary it writes (or stop when the baseline did not learn)."""
    set_seeds(params.seed)
    clear_stage_outputs(workspace, "train")  # a run that stops (the chance floor) leaves nothing stale
    workspace.keras_dir.mkdir(parents=True, exist_ok=True)
    model, tuning = train_baseline(params.train, prepared)
    baseline_val = optimize.keras_accuracy(model, prepared.val)
    quality = quality_floor(params.train, baseline_val, prepared.val.y, len(prepared.val.labels))
    check_learned(params.train, quality, model, tuning)
    model.save(workspace.keras_model("baseline"))
    test_probabilities = heads.with_probabilities(model, tuning.output).predict(prepared.test.x, batch_size=256,
                                                                                 verbose=0)
    test_accuracy = float(np.mean(np.argmax(test_probabilities, axis=1) == prepared.test.y))
    write_reference_outputs(workspace, test_probabilities, prepared.test.y)
    log.info("baseline %s (%s head): val %.4f, test %.4f", params.train.model, tuning.output, baseline_val,
             test_accuracy)
    ptq, qat = check_qat(model, baseline_val, params.quantize, prepared, tuning, workspace)
    pruning = (run_pruning(model, baseline_val, params.prune, params.quantize, tuning, workspace)
               if params.prune.enabled else None)
    clustering = run_clusterings(params, model, pruning, baseline_val, tuning, workspace)
    summary = TrainSummary(
        model=params.train.model, params_count=int(model.count_params()),
        input_shape=list(prepared.train.input_shape), labels=prepared.train.labels, output=tuning.output,
        quality=quality, batchnorm=tuning.batchnorm_checks,
        baseline=BaselineSummary(file=workspace.keras_model("baseline").name, val_accuracy=baseline_val,
                                 test_accuracy=test_accuracy),
        ptq_check=ptq, qat=qat, pruning=pruning, clustering=clustering,
    )
    write_train_summary(workspace, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop train", description="train stage: baseline, QAT, pruning, clustering"))
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        summary = train(params, read_prepared(workspace), workspace)
        print(summary.model_dump_json(include={"model", "params_count", "output", "quality", "baseline", "ptq_check"},
                                      indent=2))

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
