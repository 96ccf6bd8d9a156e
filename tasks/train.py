"""The ``train`` stage: float32 baseline, then PTQ check, QAT, pruning and PQAT as the recipe asks.

Writes to ``train.output_dir``: ``baseline.h5`` and, as needed, ``qat.h5``, ``pruned.h5``,
``pruned_qat.h5``; ``reference_outputs.npz`` (float32 test-set probabilities, the yardstick of every
variant) and ``train_summary.json`` (accuracies and every decision the recipe made, read by ``convert``).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from tasks import optimize
from tasks.config import Params
from tasks.data import PreparedData, load_prepared
from tasks.tfsetup import set_seeds

log = logging.getLogger(__name__)
SUMMARY_FILE = "train_summary.json"
REFERENCE_FILE = "reference_outputs.npz"


def build_baseline(params: Params, prepared: PreparedData) -> Any:
    """The untrained (or pretrained, for ``keras_file``) float32 model for this data."""
    from tasks import zoo

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
    if strategy in ("qat", "all"):
        return True, f"strategy {strategy}"
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
                out: Path) -> dict[str, Any]:
    """Sparsity search, then PQAT (or PTQ) for the pruned + int8 variant; saves the models it keeps.

    A model tfmot cannot prune is reported, not a crashed stage: the pruned variant is then skipped.
    """
    try:
        pruned, trials, within_budget = optimize.search_sparsity(
            model, baseline_val, params.prune, prepared.train, prepared.val, params.train.batch_size)
    except Exception as error:  # tfmot raises ValueError/RuntimeError for layers it cannot prune
        log.warning("pruning failed: %s", error)
        return {"error": f"{type(error).__name__}: {error}"[:500], "unsupported_layers":
                optimize.unsupported_layers(model, "prune")}
    pruned.save(out / "pruned.h5")
    use_pqat, reason = pruned_int8_method(params.quantize.strategy)
    source, method = "pruned.h5", "ptq"
    if use_pqat:
        try:
            pqat = optimize.prune_preserving_qat(pruned, params.quantize, params.train, prepared.train, prepared.val)
            pqat.save(out / "pruned_qat.h5")
            source, method = "pruned_qat.h5", "pqat"
        except Exception as error:  # layers PQAT cannot quantize: fall back to PTQ of the pruned model
            log.warning("PQAT failed (%s); using post-training quantization of the pruned model", error)
            reason = f"PQAT failed ({type(error).__name__}: {error}); post-training quantization instead"[:500]
    return {
        "trials": [trial.__dict__ for trial in trials],
        "within_budget": within_budget,
        "sparsity": optimize.kernel_sparsity(pruned),
        "file": "pruned.h5",
        "int8": {"method": method, "reason": reason, "file": source},
    }


def train(params: Params, prepared: PreparedData) -> dict[str, Any]:
    """Run the whole stage and return the summary it writes."""
    set_seeds(params.seed)
    out = Path(params.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = train_baseline(params, prepared)
    model.save(out / "baseline.h5")
    baseline_val = optimize.keras_accuracy(model, prepared.val)
    test_probabilities = model.predict(prepared.test.x, batch_size=256, verbose=0)
    test_accuracy = float(np.mean(np.argmax(test_probabilities, axis=1) == prepared.test.y))
    np.savez_compressed(out / REFERENCE_FILE, probabilities=test_probabilities, labels=prepared.test.y)
    log.info("baseline %s: val %.4f, test %.4f", params.train.model, baseline_val, test_accuracy)

    ptq_val = optimize.ptq_accuracy(model, prepared.representative, prepared.val)
    ptq_drop = 100.0 * (baseline_val - ptq_val)
    want_qat, qat_reason = needs_qat(params.quantize.strategy, ptq_drop, params.quantize.max_ptq_drop_pts)
    qat_summary: dict[str, Any] = {"trained": False, "reason": qat_reason, "file": None}
    if want_qat:
        outcome = run_qat(model, params, prepared)
        qat_summary.update(outcome.summary())
        if outcome.model is not None:
            outcome.model.save(out / "qat.h5")
            qat_summary.update(trained=True, file="qat.h5",
                               val_accuracy=optimize.keras_accuracy(outcome.model, prepared.val))
    else:
        qat_summary["unsupported_layers"] = optimize.unsupported_layers(model, "quantize")

    summary = {
        "model": params.train.model,
        "params_count": int(model.count_params()),
        "input_shape": list(prepared.train.input_shape),
        "labels": prepared.train.labels,
        "baseline": {"file": "baseline.h5", "val_accuracy": baseline_val, "test_accuracy": test_accuracy},
        "ptq_check": {"val_accuracy": ptq_val, "drop_pts": ptq_drop},
        "qat": qat_summary,
        "pruning": run_pruning(model, baseline_val, params, prepared, out) if params.prune.enabled else None,
    }
    (out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    write_train_metrics(summary, Path(params.train.metrics_file))
    return summary


def write_train_metrics(summary: dict[str, Any], path: Path) -> None:
    """The headline numbers of the summary, flat, for ``dvc metrics``."""
    pruning = summary["pruning"] or {}  # None when disabled; {"error": ...} when tfmot could not prune
    metrics = {"baseline_val_accuracy": summary["baseline"]["val_accuracy"],
               "baseline_test_accuracy": summary["baseline"]["test_accuracy"],
               "ptq_val_drop_pts": summary["ptq_check"]["drop_pts"],
               "qat_val_accuracy": summary["qat"].get("val_accuracy"),
               "pruned_sparsity": pruning.get("sparsity"), "params_count": summary["params_count"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(metrics, indent=2) + "\n")


def read_summary(model_dir: Path) -> dict[str, Any]:
    from tasks.cli import read_stage_output

    return read_stage_output(model_dir / SUMMARY_FILE, "train")


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_stage

    parser = argparse.ArgumentParser(description="train stage: baseline, QAT, pruning")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    def stage(params: Params) -> None:
        summary = train(params, load_prepared(Path(params.data.output_dir)))
        print(json.dumps({k: summary[k] for k in ("model", "params_count", "baseline", "ptq_check")}, indent=2))

    return run_stage(args.params, stage)


if __name__ == "__main__":
    # run the importable module, not __main__, so the error classes raised are the ones tasks.cli catches
    from tasks.train import main as stage_main

    raise SystemExit(stage_main())
