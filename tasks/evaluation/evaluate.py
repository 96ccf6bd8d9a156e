"""The ``evaluate`` stage: measure every variant in its device runtime, apply the quality gates.

Each variant runs through :mod:`edge.runtime` (LiteRT or ONNX Runtime, never TensorFlow) on the
frozen test set and is compared with the float32 Keras model's outputs. The gates mark each row
pass/fail with the reason; the recommended variant is the best passing one by
``evaluate.recommend_by``. When nothing passes the record says why (``failure``): the register stage
logs the rejected run to MLflow and fails, registering nothing.
"""

from __future__ import annotations

import argparse
import gzip
import io
import logging
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from edge.bench.measure import measure_latency, memory_footprint_in_fresh_process
from edge.runtime import EdgeModel
from edge.sidecar import read_sidecar, sidecar_path
from tasks.config import EvaluateParams, Params
from tasks.contracts import (
    ConversionResult,
    Dataset,
    Evaluation,
    VariantRow,
    Workspace,
    clear_stage_outputs,
    read_conversion,
    read_prepared,
    read_reference_outputs,
    read_train_summary,
)
from tasks.devices import DEVICES_FILE, DeviceInventory, load_devices
from tasks.entrypoint import run_stage, stage_arguments
from tasks.evaluation.gates import apply_gates, gate_failure_message, mark_devices, recommend
from tasks.evaluation.report import write_reports
from tasks.evaluation.weights import weight_bytes
from tasks.variants import REFERENCE_VARIANT, VARIANTS

log = logging.getLogger(__name__)


def gzip_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9))


def bundle_bytes(path: Path) -> int:
    """The gzip bytes a bundle spends on this variant: its model file and sidecar in a tar (the manifest, signature
    and sample input are the same few KB for every variant)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as archive:
        for member in (path, sidecar_path(path)):
            archive.add(member, arcname=member.name)
    return len(buffer.getvalue())


def fleet_devices(fleet_file: Path) -> int | None:
    """How many devices the fleet file lists (None without one): what a rollout sends a bundle to."""
    if not fleet_file.is_file():
        return None
    try:
        devices = (yaml.safe_load(fleet_file.read_text()) or {}).get("devices") or {}
    except (yaml.YAMLError, AttributeError) as error:  # the rollout names what is wrong with it; here: no column
        log.warning("fleet file %s unreadable (%s): no fleet bytes column", fleet_file, error)
        return None
    return len(devices) if isinstance(devices, dict) else None


def measure_variant(path: Path, test: Dataset, reference: np.ndarray, reference_accuracy: float,
                    params: EvaluateParams) -> dict[str, Any]:
    """Accuracy, agreement and output difference vs float32, sizes, latency and memory of one model file."""
    model = EdgeModel.load(path)  # checks the file against its sidecar's sha256 first
    sidecar = read_sidecar(path)
    outputs = model.predict(test.x)
    predictions = np.argmax(outputs, axis=1)
    accuracy = float(np.mean(predictions == test.y))
    latency = measure_latency(model, test.x[0], params.latency_warmup_runs, params.latency_runs)
    return {
        "accuracy": accuracy,
        "accuracy_drop_pts": 100.0 * (reference_accuracy - accuracy),
        "agreement": float(np.mean(predictions == np.argmax(reference, axis=1))),
        "max_abs_diff": float(np.max(np.abs(outputs - reference))),
        "size_bytes": path.stat().st_size,
        "gzip_bytes": gzip_size(path),
        "weight_bytes": weight_bytes(path),
        "sparsity": sidecar.get("sparsity"),
        "file_sparsity": (sidecar.get("weight_structure") or {}).get("weight_sparsity"),
        "max_distinct_weights": (sidecar.get("weight_structure") or {}).get("max_distinct_weights"),
        "bundle_bytes": bundle_bytes(path),
        "latency_p50_ms": latency.p50_ms,
        "latency_p95_ms": latency.p95_ms,
        **memory_footprint_in_fresh_process(path),
    }


def evaluate_variants(params: EvaluateParams, workspace: Workspace, conversions: list[ConversionResult], test: Dataset,
                      inventory: DeviceInventory, fleet_size: int | None = None) -> list[VariantRow]:
    """One :class:`VariantRow` per conversion result, measured, gated and checked against each device."""
    reference = read_reference_outputs(workspace)
    reference_accuracy = float(np.mean(np.argmax(reference, axis=1) == test.y))
    rows = []
    for result in conversions:
        row = VariantRow(variant=result.variant, status=result.status, runtime=VARIANTS[result.variant].runtime,
                         method=result.method, error=result.error)
        if result.status == "ok":
            try:
                measured = measure_variant(workspace.variant_file(result.variant), test, reference,
                                           reference_accuracy, params)
                row = row.model_copy(update=measured)
            except Exception as error:  # runtimes raise anything on a broken file: the row carries it
                row.status, row.error = "failed", f"evaluation: {type(error).__name__}: {error}"[:500]
        rows.append(row)
    reference_row = next((r for r in rows if r.variant == REFERENCE_VARIANT and r.status == "ok"), None)
    if reference_row is not None:
        reference_size, reference_weights = reference_row.size_bytes, reference_row.weight_bytes
    else:  # no tflite_fp32 built: compare with the float32 weights' bytes
        reference_size = reference_weights = 4 * read_train_summary(workspace).params_count
    for row in rows:
        if row.size_bytes:
            row.size_reduction = reference_size / row.size_bytes
        if row.weight_bytes:
            row.weight_reduction = reference_weights / row.weight_bytes
        if row.bundle_bytes and fleet_size:
            row.fleet_bytes = row.bundle_bytes * fleet_size
        apply_gates(row, params.gates)
        mark_devices(row, inventory)
    return rows


def evaluate(params: EvaluateParams, workspace: Workspace, conversions: list[ConversionResult],
             devices_path: Path = DEVICES_FILE, fleet_file: Path | None = None) -> Evaluation:
    """Run the stage: rows, recommendation and reports (also when nothing passes: ``failure`` says why)."""
    inventory = load_devices(devices_path)
    clear_stage_outputs(workspace, "evaluate")
    prepared = read_prepared(workspace)
    rows = evaluate_variants(params, workspace, conversions, prepared.test, inventory,
                             fleet_devices(fleet_file) if fleet_file else None)
    best = recommend(rows, params.recommend_by)
    evaluation = Evaluation(recommended=best.variant if best else None, recommend_by=params.recommend_by,
                            gates=params.gates.model_dump(), rows=rows,
                            failure="" if best else gate_failure_message(rows, params.gates))
    write_reports(evaluation, workspace)
    return evaluation


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop evaluate", description="evaluate stage: comparison matrix and quality gates"))
    parser.add_argument("--devices", type=Path, default=DEVICES_FILE, help="device inventory (default: %(default)s)")
    parser.add_argument("--fleet", type=Path, help="fleet file whose devices the fleet bytes column counts "
                        "(default: rollout.fleet_file)")
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        evaluation = evaluate(params.evaluate, workspace, read_conversion(workspace), args.devices,
                              args.fleet or params.rollout.fleet_file)
        print(workspace.comparison_file("md").read_text())
        print(f"recommended variant: {evaluation.recommended}" if evaluation.recommended else evaluation.failure)

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
