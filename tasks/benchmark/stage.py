"""The ``benchmark`` stage: every candidate variant measured on every target device, gated per device.

For each device (``benchmark.devices``, default all of ``devices.yaml``) the candidates that the evaluate
stage measured (status ok) and the first ``benchmark.eval_samples`` test samples are staged and sent
through the device's runner (:mod:`tasks.benchmark.runners`), devices in parallel. Every (variant,
configuration, device) becomes a :class:`~tasks.contracts.DeviceBenchRow`: device figures, on-device
accuracy and its drop from the float32 model on the same samples, agreement with the host's labels, and
the device gates. A device that cannot be reached gives error rows with the reason; the others go on.
The recommended variant per device is the best passing one. Outputs: ``reports/benchmark/``.

CLI: ``edgeloop benchmark [--devices devices.yaml] [--device NAME ...] [--params] [--workspace]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from edge.files import atomic_write_text
from edge.runtime import EdgeModel
from tasks.benchmark.dispatch import run_with_retries, runner_for
from tasks.benchmark.report import write_benchmark_reports
from tasks.benchmark.runners import RunnerError
from tasks.benchmark.staging import Candidate, stage_inputs
from tasks.config import BenchmarkParams, PackageParams, Params
from tasks.contracts import (
    BenchmarkSummary,
    DeviceBenchRow,
    DeviceOutcome,
    Evaluation,
    Workspace,
    clear_stage_outputs,
    read_evaluation,
    read_prepared,
    read_reference_outputs,
)
from tasks.devices import DEVICES_FILE, DeviceSpec, load_devices
from tasks.entrypoint import run_stage, stage_arguments
from tasks.errors import ConfigError, StageError
from tasks.evaluation.gates import apply_device_gates, recommend_on_device

log = logging.getLogger(__name__)


def select_devices(params: BenchmarkParams, devices_path: Path, names: list[str] | None) -> list[DeviceSpec]:
    """The inventory's devices named by ``names`` (the CLI), else by ``benchmark.devices``, else all of them."""
    inventory = load_devices(devices_path)
    wanted = names or params.devices
    unknown = sorted(set(wanted) - {device.name for device in inventory.devices})
    if unknown:
        raise ConfigError(f"benchmark.devices names unknown device(s) {', '.join(unknown)}; "
                          f"{devices_path} has {', '.join(d.name for d in inventory.devices)}")
    return [device for device in inventory.devices if not wanted or device.name in wanted]


def rows_from_document(device: DeviceSpec, document: dict[str, Any], variants: dict[str, str],
                       reference_accuracy: float,
                       host_labels: dict[str, np.ndarray]) -> list[DeviceBenchRow]:
    """One row per result of an ``edge.bench`` document; ``variants`` maps file names to variant names."""
    environment = document["environment"]
    runner = document.get("runner", {}).get("kind", device.runner.kind)
    rows = []
    for result in document["results"]:
        variant = variants.get(result["model"], result["model"])
        row = DeviceBenchRow(device=device.name, variant=variant, config=result["config"]["name"], runner=runner,
                             status=result["status"], error=result.get("error") or "",
                             emulated=bool(environment.get("emulated")), arch=environment.get("arch"))
        if result["status"] == "ok":
            latency, predictions = result["latency"], result.get("predictions")
            agreement = None
            if predictions is not None and variant in host_labels:
                agreement = float(np.mean(np.asarray(predictions) == host_labels[variant][:len(predictions)]))
            row = row.model_copy(update={
                "runtime": result["runtime"], "accelerators": result["accelerators"], "fallback": result["fallback"],
                "size_bytes": result["size_bytes"], "init_ms": result["phases"]["init_ms"],
                "first_inference_ms": result["phases"]["first_inference_ms"], "p50_ms": latency["p50_ms"],
                "p95_ms": latency["p95_ms"], "p99_ms": latency["p99_ms"], "throughput_ips": result["throughput_ips"],
                "peak_rss_bytes": result["memory"]["peak_rss_bytes"], "accuracy": result["accuracy"],
                "accuracy_drop_pts": None if result["accuracy"] is None
                else 100.0 * (reference_accuracy - result["accuracy"]),
                "host_agreement": agreement, "energy_mj": result["energy"]["per_inference_mj"],
                "throttled": result["thermal"]["throttled"]})
        rows.append(row)
    return rows


def error_rows(device: DeviceSpec, variants: list[str], message: str) -> list[DeviceBenchRow]:
    return [DeviceBenchRow(device=device.name, variant=variant, runner=device.runner.kind, status="error",
                           error=message) for variant in variants]


def benchmark_device(params: BenchmarkParams, package: PackageParams, device: DeviceSpec, candidates: list[Candidate],
                     eval_x: np.ndarray, eval_y: np.ndarray,
                     workspace: Workspace) -> tuple[dict[str, Any] | None, str]:
    """The device's ``edge.bench`` document (also saved under reports/benchmark/), or None and the error."""
    with tempfile.TemporaryDirectory(prefix=f"edgeloop-bench-{device.name}-") as scratch:
        inputs = stage_inputs(candidates, eval_x, eval_y, device, params, Path(scratch) / "inputs", params.timeout_s)
        try:
            document = run_with_retries(runner_for(device, params, package), device, inputs, params)
        except RunnerError as error:
            log.warning("%s (%s runner): %s", device.name, device.runner.kind, error)
            return None, str(error)
        except Exception as error:  # a runner bug must not end the other devices' benchmarks
            log.exception("%s: the %s runner failed", device.name, device.runner.kind)
            return None, f"{device.runner.kind} runner failed: {type(error).__name__}: {error}"
    atomic_write_text(workspace.benchmark_device_file(device.name), json.dumps(document, indent=2) + "\n")
    return document, ""


def host_labels(workspace: Workspace, candidates: list[Candidate], eval_x: np.ndarray) -> dict[str, np.ndarray]:
    """Each candidate's labels on the eval subset computed on this host (to compare device numerics with)."""
    return {c.variant: np.argmax(EdgeModel.load(c.path).predict(eval_x), axis=1) for c in candidates}


def benchmark(params: Params, workspace: Workspace, devices_path: Path = DEVICES_FILE,
              device_names: list[str] | None = None, evaluation: Evaluation | None = None) -> BenchmarkSummary:
    """Run the stage; returns the summary (also written to reports/benchmark/summary.json)."""
    devices = select_devices(params.benchmark, devices_path, device_names)
    evaluation = evaluation or read_evaluation(workspace)
    candidates = [Candidate(row.variant, workspace.variant_file(row.variant)) for row in evaluation.rows
                  if row.status == "ok"]
    if not candidates:
        raise StageError("no variant was measured by the evaluate stage; nothing to benchmark on devices")
    test = read_prepared(workspace).test
    count = min(params.benchmark.eval_samples, len(test.x))
    eval_x, eval_y = test.x[:count], test.y[:count]
    reference = read_reference_outputs(workspace)[:count]
    reference_accuracy = float(np.mean(np.argmax(reference, axis=1) == eval_y))
    labels_on_host = host_labels(workspace, candidates, eval_x)
    clear_stage_outputs(workspace, "benchmark")
    shutil.rmtree(workspace.benchmark_dir, ignore_errors=True)
    workspace.benchmark_dir.mkdir(parents=True)
    file_to_variant = {c.path.name: c.variant for c in candidates}

    def one(device: DeviceSpec) -> tuple[DeviceOutcome, list[DeviceBenchRow]]:
        document, error = benchmark_device(params.benchmark, params.package, device, candidates, eval_x, eval_y,
                                           workspace)
        if document is None:
            return (DeviceOutcome(device=device.name, runner=device.runner.kind, status="error", error=error),
                    error_rows(device, [c.variant for c in candidates], error))
        rows = rows_from_document(device, document, file_to_variant, reference_accuracy, labels_on_host)
        for row in rows:
            apply_device_gates(row, device, params.evaluate.gates, params.benchmark.max_rss_fraction)
        best = recommend_on_device(rows, device, params.evaluate.recommend_by,
                                   {row.variant: row for row in evaluation.rows})
        outcome = DeviceOutcome(device=device.name, runner=device.runner.kind, status="ok",
                                emulated=bool(document["environment"].get("emulated")),
                                recommended=best.variant if best else None,
                                recommended_config=best.config if best else None)
        return outcome, rows

    with ThreadPoolExecutor(max_workers=params.benchmark.parallel) as pool:
        results = list(pool.map(one, devices))
    summary = BenchmarkSummary(recommend_by=params.evaluate.recommend_by, eval_samples=count,
                               reference_accuracy=reference_accuracy, devices=[o for o, _ in results],
                               rows=[row for _, rows in results for row in rows])
    write_benchmark_reports(summary, evaluation, workspace)
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop benchmark", description="benchmark stage: every candidate on every device, through its runner"))
    parser.add_argument("--devices", type=Path, default=DEVICES_FILE, help="device inventory (default: %(default)s)")
    parser.add_argument("--device", action="append", dest="names", help="only this device (repeatable)")
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        summary = benchmark(params, workspace, args.devices, args.names)
        print(workspace.benchmark_report("md").read_text())
        failed = [outcome.device for outcome in summary.devices if outcome.status != "ok"]
        if failed:
            print(f"not benchmarked (see the error rows): {', '.join(failed)}")

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
