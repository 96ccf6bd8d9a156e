"""The ``evaluate`` stage: measure every variant in its device runtime, apply the quality gates.

Each variant runs through :mod:`edge.runtime` (LiteRT or ONNX Runtime, never TensorFlow) on the
frozen test set and is compared with the float32 Keras model's outputs. The gates mark each row
pass/fail with the reason; the recommended variant is the best passing one by
``evaluate.recommend_by``. When nothing passes the reports are still written, then the stage fails
naming each gate and its margin.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.measure import measure_latency
from edge.runtime import EdgeModel
from edge.sidecar import read_sidecar
from tasks.cli import StageError, read_stage_output
from tasks.config import EvaluateParams, GateParams, Params
from tasks.convert import ConversionResult, read_results
from tasks.data import Dataset, load_prepared
from tasks.devices import DeviceInventory, device_fit, load_devices
from tasks.train import REFERENCE_FILE, read_summary
from tasks.variants import REFERENCE_VARIANT, VARIANTS

MB = 1024 * 1024
EVALUATION_FILE = "evaluation.json"


@dataclass
class VariantRow:
    variant: str
    status: str  # ok | failed | skipped (from conversion) or failed (evaluation error)
    runtime: str = ""
    method: str = ""
    error: str = ""
    accuracy: float | None = None
    accuracy_drop_pts: float | None = None
    agreement: float | None = None
    max_abs_diff: float | None = None
    size_bytes: int | None = None
    gzip_bytes: int | None = None
    size_reduction: float | None = None
    sparsity: float | None = None
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    model_rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    gates_passed: bool = False
    gate_failures: list[str] = field(default_factory=list)
    devices: dict[str, str] = field(default_factory=dict)


class GateFailure(StageError):
    """No variant passed every quality gate."""


def gzip_size(path: Path) -> int:
    return len(gzip.compress(path.read_bytes(), compresslevel=9))


def memory_footprint(path: Path) -> dict[str, int]:
    """Model and peak process RSS of a fresh process that loads and runs the model, measured on this host."""
    completed = subprocess.run([sys.executable, "-m", "edge.measure", str(path)], capture_output=True, text=True,
                               timeout=120, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


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
        "sparsity": sidecar.get("sparsity"),
        "latency_p50_ms": latency.p50_ms,
        "latency_p95_ms": latency.p95_ms,
        **memory_footprint(path),
    }


def apply_gates(row: VariantRow, gates: GateParams) -> None:
    """Mark ``row`` pass/fail; each failure names the gate, the value and the margin."""
    if row.status != "ok":
        row.gate_failures = [f"not evaluated ({row.status})"]
        return
    checks = [
        ("accuracy drop", row.accuracy_drop_pts, gates.max_accuracy_drop_pts, "pts", "max"),
        ("size reduction", row.size_reduction, gates.min_size_reduction, "x", "min"),
        ("host p95 latency", row.latency_p95_ms, gates.max_host_latency_ms, "ms", "max"),
    ]
    for name, value, limit, unit, kind in checks:
        if value is None:
            row.gate_failures.append(f"{name}: not measured")
        elif kind == "max" and value > limit:
            margin = f"over by {value - limit:.2f}{unit}"
            row.gate_failures.append(f"{name} {value:.2f}{unit} > max {limit}{unit} ({margin})")
        elif kind == "min" and value < limit:
            margin = f"short by {limit - value:.2f}{unit}"
            row.gate_failures.append(f"{name} {value:.2f}{unit} < min {limit}{unit} ({margin})")
    row.gates_passed = not row.gate_failures


def mark_devices(row: VariantRow, inventory: DeviceInventory) -> None:
    for device in inventory.devices:
        if row.status != "ok":
            row.devices[device.name] = "n/a"
            continue
        fits, reason = device_fit(device, row.size_bytes or 0, row.peak_rss_bytes or 0)
        row.devices[device.name] = "fit" if fits else f"unfit: {reason}"


def recommend(rows: list[VariantRow], recommend_by: str) -> VariantRow | None:
    passing = [row for row in rows if row.gates_passed]
    keys = {
        "size": lambda r: (r.size_bytes, -r.accuracy, r.latency_p95_ms),
        "gzip_size": lambda r: (r.gzip_bytes, -r.accuracy, r.latency_p95_ms),
        "latency": lambda r: (r.latency_p95_ms, -r.accuracy, r.size_bytes),
        "accuracy": lambda r: (-r.accuracy, r.size_bytes, r.latency_p95_ms),
    }
    return min(passing, key=keys[recommend_by]) if passing else None


def recommend_per_device(rows: list[dict[str, Any]], inventory: DeviceInventory, recommend_by: str,
                         device_names: list[str] | None = None) -> dict[str, str | None]:
    """For each device: the best variant that passes the gates and fits it, its preferred runtime first."""
    picks: dict[str, str | None] = {}
    for device in inventory.devices:
        if device_names and device.name not in device_names:
            continue
        fitting = [VariantRow(**row) for row in rows
                   if row["gates_passed"] and row["devices"].get(device.name) == "fit"]
        preferred = [row for row in fitting if row.runtime == device.preferred_runtime]
        best = recommend(preferred or fitting, recommend_by)
        picks[device.name] = best.variant if best else None
    return picks


def evaluate_variants(params: Params, conversions: list[ConversionResult], test: Dataset,
                      inventory: DeviceInventory) -> list[VariantRow]:
    """One :class:`VariantRow` per conversion result, measured, gated and checked against each device."""
    model_dir, variant_dir = Path(params.train.output_dir), Path(params.convert.output_dir)
    reference_file = np.load(model_dir / REFERENCE_FILE)
    reference = reference_file["probabilities"]
    reference_accuracy = float(np.mean(np.argmax(reference, axis=1) == test.y))
    rows = []
    for result in conversions:
        row = VariantRow(result.variant, result.status, VARIANTS[result.variant].runtime, result.method,
                         result.error)
        if result.status == "ok":
            try:
                for key, value in measure_variant(variant_dir / result.file, test, reference, reference_accuracy,
                                                  params.evaluate).items():
                    setattr(row, key, value)
            except Exception as error:  # a broken variant is a row with its error
                row.status, row.error = "failed", f"evaluation: {type(error).__name__}: {error}"[:500]
        rows.append(row)
    reference_size = next((r.size_bytes for r in rows if r.variant == REFERENCE_VARIANT and r.status == "ok"), None)
    if reference_size is None:  # no tflite_fp32 built: compare with the float32 weights' bytes
        reference_size = 4 * read_summary(model_dir)["params_count"]
    for row in rows:
        if row.size_bytes:
            row.size_reduction = reference_size / row.size_bytes
        apply_gates(row, params.evaluate.gates)
        mark_devices(row, inventory)
    return rows


def gate_failure_message(rows: list[VariantRow], gates: GateParams) -> str:
    lines = [f"no variant passed the quality gates (max accuracy drop {gates.max_accuracy_drop_pts} pts, "
             f"min size reduction {gates.min_size_reduction}x, max host p95 latency {gates.max_host_latency_ms} ms):"]
    lines += [f"  - {row.variant}: {'; '.join(row.gate_failures)}" for row in rows]
    lines.append("relax evaluate.gates in params.yaml or improve the model (more epochs, QAT, lower sparsity)")
    return "\n".join(lines)


def evaluate(params: Params, devices_path: Path = Path("devices.yaml")) -> dict[str, Any]:
    """Run the stage: rows, reports, and the recommendation; raise :class:`GateFailure` if none passes."""
    from tasks.report import write_reports

    inventory = load_devices(devices_path)
    prepared = load_prepared(Path(params.data.output_dir))
    rows = evaluate_variants(params, read_results(Path(params.convert.output_dir)), prepared.test, inventory)
    best = recommend(rows, params.evaluate.recommend_by)
    evaluation = {"recommended": best.variant if best else None, "recommend_by": params.evaluate.recommend_by,
                  "gates": params.evaluate.gates.model_dump(), "rows": [asdict(row) for row in rows]}
    write_reports(evaluation, Path(params.evaluate.output_dir))
    if best is None:
        raise GateFailure(gate_failure_message(rows, params.evaluate.gates))
    return evaluation


def read_evaluation(report_dir: Path) -> dict[str, Any]:
    return read_stage_output(report_dir / EVALUATION_FILE, "evaluate")


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_stage

    parser = argparse.ArgumentParser(description="evaluate stage: comparison matrix and quality gates")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--devices", default="devices.yaml")
    args = parser.parse_args(argv)

    def stage(params: Params) -> None:
        evaluation = evaluate(params, Path(args.devices))
        print((Path(params.evaluate.output_dir) / "comparison.md").read_text())
        print(f"recommended variant: {evaluation['recommended']}")

    return run_stage(args.params, stage)


if __name__ == "__main__":
    # run the importable module, not __main__, so the error classes raised are the ones tasks.cli catches
    from tasks.evaluate import main as stage_main

    raise SystemExit(stage_main())
