"""The ``train`` stage: float32 baseline, then PTQ check, QAT, pruning and PQAT as the recipe asks.

Writes the Keras models (``baseline.h5`` and, as needed, ``qat.h5``, ``pruned.h5``, ``pruned_qat.h5``),
the float32 test-set probabilities (the yardstick of every variant) and a :class:`TrainSummary` of
every decision the recipe made, all where :class:`tasks.contracts.Workspace` says.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import Params
from tasks.contracts import (
    BaselineSummary,
    PreparedData,
    PrunedInt8,
    PruningSummary,
    PtqCheck,
    QatSummary,
    TrainSummary,
    Workspace,
    read_prepared,
    write_reference_outputs,
    write_train_summary,
)
from tasks.entrypoint import run_stage, stage_arguments
from tasks.model import optimize
from tasks.model.tfsetup import set_seeds

log = logging.getLogger(__name__)


def build_baseline(params: Params, prepared: PreparedData) -> Any:
    """The untrained (or pretrained, for ``keras_file``) float32 model for this data."""
    from tasks.model import zoo  # imports TensorFlow: only when a model is built (keeps --help instant)

    input_shape, num_classes = prepared.train.input_shape, len(prepared.train.labels)
    if params.train.model == "keras_file":
        loaded = zoo.load_keras_model(Path(params.train.model_path))
        return zoo.adapt_model(loaded, input_shape, num_classes)
    return zoo.build_model(params.train.model, input_shape, num_classes)


def train_baseline(params: Params, prepared: PreparedData) -> Any:
    model = build_baseline(params, prepared)
    optimize.compile_model(model, params.train.learning_rate)
    optimize.fit(model, prepared.train, prepared.val, params.train.epochs, params.train.batch_size)
    return model


def needs_qat(strategy: str, ptq_drop_pts: float, max_drop_pts: float) -> tuple[bool, str]:
    """Whether the recipe calls for QAT, and why (recorded in the summary)."""
    if strategy == "qat":
        return True, "strategy qat"
    if strategy == "ptq":
        return False, "strategy ptq"
    if ptq_drop_pts > max_drop_pts:
        return True, f"PTQ drop {ptq_drop_pts:.2f} pts > {max_drop_pts} pts"
    return False, f"PTQ drop {ptq_drop_pts:.2f} pts <= {max_drop_pts} pts; QAT not needed"


def run_qat(model: Any, params: Params, prepared: PreparedData) -> optimize.QatOutcome:
    outcome = optimize.quantize_aware(optimize.copy_model(model))
    if outcome.model is not None:
        optimize.compile_model(outcome.model, params.quantize.qat_learning_rate)
        optimize.fit(outcome.model, prepared.train, prepared.val, params.quantize.qat_epochs, params.train.batch_size)
    return outcome


def pruned_int8_method(strategy: str) -> tuple[bool, str]:
    """The pruned + int8 variant uses pruning-preserving QAT unless the strategy rules out training."""
    if strategy == "ptq":
        return False, "strategy ptq: post-training quantization of the pruned model"
    return True, f"strategy {strategy}: pruning-preserving QAT (PQAT) keeps the zeros through quantization"


def run_pruning(model: Any, baseline_val: float, params: Params, prepared: PreparedData,
                workspace: Workspace) -> PruningSummary:
    """Sparsity search, then PQAT (or PTQ) for the pruned + int8 variant; saves the models it keeps.

    A model tfmot cannot prune is reported, not a crashed stage: the pruned variant is then skipped.
    """
    try:
        pruned, trials, within_budget = optimize.search_sparsity(
            model, baseline_val, params.prune, prepared.train, prepared.val, params.train.batch_size)
    except optimize.TfmotRefused as error:
        log.warning("pruning failed: %s", error)
        return PruningSummary(error=str(error), unsupported_layers=optimize.unsupported_layers(model, "prune"))
    pruned.save(workspace.keras_model("pruned.h5"))
    use_pqat, reason = pruned_int8_method(params.quantize.strategy)
    source, method = "pruned.h5", "ptq"
    if use_pqat:
        try:
            pqat = optimize.prune_preserving_qat(pruned, params.quantize, params.train, prepared.train, prepared.val)
            pqat.save(workspace.keras_model("pruned_qat.h5"))
            source, method = "pruned_qat.h5", "pqat"
        except optimize.TfmotRefused as error:  # layers PQAT cannot quantize: PTQ of the pruned model instead
            log.warning("PQAT failed (%s); using post-training quantization of the pruned model", error)
            reason = f"PQAT failed ({error}); post-training quantization instead"[:500]
    return PruningSummary(trials=trials, within_budget=within_budget, sparsity=optimize.kernel_sparsity(pruned),
                          file="pruned.h5", int8=PrunedInt8(method=method, reason=reason, file=source))


def check_qat(model: Any, baseline_val: float, params: Params, prepared: PreparedData,
              workspace: Workspace) -> tuple[PtqCheck, QatSummary]:
    """Measure full-integer PTQ in LiteRT; train QAT when the strategy (or the drop) asks for it."""
    ptq_val = optimize.ptq_accuracy(model, prepared.representative, prepared.val)
    ptq = PtqCheck(val_accuracy=ptq_val, drop_pts=100.0 * (baseline_val - ptq_val))
    want_qat, reason = needs_qat(params.quantize.strategy, ptq.drop_pts, params.quantize.max_ptq_drop_pts)
    if not want_qat:
        return ptq, QatSummary(reason=reason, unsupported_layers=optimize.unsupported_layers(model, "quantize"))
    outcome = run_qat(model, params, prepared)
    qat = QatSummary(reason=reason, mode=outcome.mode, unsupported_layers=outcome.unsupported_layers,
                     error=outcome.error)
    if outcome.model is not None:
        outcome.model.save(workspace.keras_model("qat.h5"))
        qat = qat.model_copy(update={"trained": True, "file": "qat.h5",
                                     "val_accuracy": optimize.keras_accuracy(outcome.model, prepared.val)})
    return ptq, qat


def train(params: Params, prepared: PreparedData, workspace: Workspace) -> TrainSummary:
    """Run the whole stage and return the summary it writes."""
    set_seeds(params.seed)
    workspace.keras_dir.mkdir(parents=True, exist_ok=True)
    model = train_baseline(params, prepared)
    model.save(workspace.keras_model("baseline.h5"))
    baseline_val = optimize.keras_accuracy(model, prepared.val)
    test_probabilities = model.predict(prepared.test.x, batch_size=256, verbose=0)
    test_accuracy = float(np.mean(np.argmax(test_probabilities, axis=1) == prepared.test.y))
    write_reference_outputs(workspace, test_probabilities, prepared.test.y)
    log.info("baseline %s: val %.4f, test %.4f", params.train.model, baseline_val, test_accuracy)
    ptq, qat = check_qat(model, baseline_val, params, prepared, workspace)
    summary = TrainSummary(
        model=params.train.model, params_count=int(model.count_params()),
        input_shape=list(prepared.train.input_shape), labels=prepared.train.labels,
        baseline=BaselineSummary(file="baseline.h5", val_accuracy=baseline_val, test_accuracy=test_accuracy),
        ptq_check=ptq, qat=qat,
        pruning=run_pruning(model, baseline_val, params, prepared, workspace) if params.prune.enabled else None,
    )
    write_train_summary(workspace, summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop train", description="train stage: baseline, QAT, pruning"))
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        summary = train(params, read_prepared(workspace), workspace)
        print(summary.model_dump_json(include={"model", "params_count", "baseline", "ptq_check"}, indent=2))

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
