"""The device gates beyond latency (README, "Device gates"): peak RSS within ``benchmark.max_rss_fraction`` of the
device's RAM, the file within its storage, on-device accuracy and its drop from the float32 model. An
``edge.bench`` document (checked against its schema) goes through the benchmark stage's row builder and the real
gate function for a device of a small inventory."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import jsonschema
import pytest

from tasks.benchmark.stage import rows_from_document
from tasks.config import GateParams
from tasks.contracts import DeviceBenchRow
from tasks.devices import MB, DeviceInventory, DeviceSpec
from tasks.evaluation.gates import apply_device_gates, recommend_on_device
from tests.conftest import REPO_ROOT

SCHEMA = json.loads((REPO_ROOT / "edge" / "bench" / "schema.json").read_text())
INVENTORY = DeviceInventory.model_validate({"devices": [
    {"name": "board-256mb", "cpu_arch": "armv7l", "cores": 2, "ram_mb": 256, "storage_mb": 4, "power_budget_w": 3.0,
     "thermal_limit_c": 85.0, "preferred_runtime": "tflite", "latency_budget_ms": 10.0, "runner": {"kind": "local"}},
    {"name": "gateway", "cpu_arch": "x86_64", "cores": 4, "ram_mb": 8192, "storage_mb": 65536, "power_budget_w": 25.0,
     "thermal_limit_c": 90.0, "preferred_runtime": "onnx", "latency_budget_ms": 50.0, "runner": {"kind": "local"}},
]})
BOARD = INVENTORY.get("board-256mb")
GATES = GateParams(min_accuracy=0.9, max_accuracy_drop_pts=1.0)
MAX_RSS_FRACTION = 0.5  # of the board's 256 MB: 128 MB
# within every limit: p95 ms, peak RSS MB, file MB, on-device accuracy, float32 accuracy on the same samples
WITHIN = {"p95_ms": 8.0, "peak_rss_mb": 100.0, "size_mb": 3.0, "accuracy": 0.95, "reference": 0.95}

# gate: (figures that exceed its limit, figures exactly at it, the failure it must report)
GATE_TABLE: dict[str, tuple[dict[str, float], dict[str, float], str]] = {
    "device p95 latency": ({"p95_ms": 12.5}, {"p95_ms": 10.0}, "device p95 latency 12.50ms > max 10.00ms"),
    "peak RSS": ({"peak_rss_mb": 130.0}, {"peak_rss_mb": 128.0}, "peak RSS 130.00MB > max 128.00MB"),
    "model size": ({"size_mb": 4.5}, {"size_mb": 4.0}, "model size 4.50MB > max 4.00MB"),
    "on-device accuracy": ({"accuracy": 0.85, "reference": 0.85}, {"accuracy": 0.9, "reference": 0.9},
                           "on-device accuracy 0.850 < min 0.9"),
    "on-device accuracy drop": ({"reference": 0.97}, {"reference": 0.955},  # 2 and 0.5 points below float32
                                "on-device accuracy drop 2.00pts > max 1.00pts"),
}


def bench_document(p95_ms: float, peak_rss_mb: float, size_mb: float, accuracy: float,
                   emulated: bool = False) -> dict[str, Any]:
    """What ``python -m edge.bench`` writes for one model measured in one configuration."""
    config = {"name": "default", "threads": 2, "xnnpack": True, "providers": []}
    peak = int(peak_rss_mb * MB)
    latency = {"p50_ms": p95_ms * 0.8, "p90_ms": p95_ms * 0.95, "p95_ms": p95_ms, "p99_ms": p95_ms * 1.1,
               "max_ms": p95_ms * 1.2, "min_ms": p95_ms * 0.5, "mean_ms": p95_ms * 0.8, "std_ms": 0.1, "runs": 100}
    result = {
        "model": "model_int8.tflite", "config": config, "status": "ok", "error": None, "wall_s": 1.0,
        "runtime": "tflite", "accelerators": [], "fallback": [], "size_bytes": int(size_mb * MB),
        "phases": {"runtime_import_ms": 50.0, "init_ms": 3.0, "first_inference_ms": p95_ms, "warmup_mean_ms": p95_ms,
                   "warmup_runs": 5},
        "latency": latency, "end_to_end": {"p50_ms": p95_ms, "p95_ms": p95_ms, "mean_ms": p95_ms},
        "throughput_ips": 1000.0 / latency["mean_ms"], "cpu_time_s": 0.5, "accuracy": accuracy, "eval_samples": 200,
        "memory": {"baseline_rss_bytes": 10 * MB, "preload_rss_bytes": 20 * MB, "init_rss_bytes": 30 * MB,
                   "peak_rss_bytes": peak, "peak_growth_bytes": peak - 20 * MB},
        "thermal": {"sensor": None, "before_c": None, "after_c": None, "limit_c": 85.0, "throttled": None},
        "energy": {"source": None, "reason": "no power sensor", "joules": None, "per_inference_mj": None},
        "rate_sweep": [],
    }
    environment = {"arch": "armv7l", "cpu_model": None, "cores": 2, "usable_cores": 2, "ram_mb": 256, "cgroup": None,
                   "memory_limit_bytes": None, "cpu_quota_cores": None, "python": "3.11", "runtimes": {},
                   "emulated": emulated}
    return {"schema": "edgeloop.bench/1", "created": "2026-01-01T00:00:00Z", "environment": environment,
            "settings": {"iterations": 100, "warmup": 5, "configs": [config]}, "results": [result]}


def gated_row(device: DeviceSpec = BOARD, emulated: bool = False, **changes: float) -> DeviceBenchRow:
    """The benchmark stage's row for a document with ``WITHIN`` changed by ``changes``, gated for ``device``."""
    figures = WITHIN | changes
    reference = figures.pop("reference")
    document = bench_document(**figures, emulated=emulated)
    jsonschema.validate(document, SCHEMA)
    (row,) = rows_from_document(device, document, {"model_int8.tflite": "tflite_int8"}, reference, {})
    apply_device_gates(row, device, GATES, MAX_RSS_FRACTION)
    return row


def failing_gates(row: DeviceBenchRow) -> list[str]:
    """The gate each failure names: its text up to the measured figure."""
    names = []
    for failure in row.gate_failures:
        named = re.match(r"(.+?) \d", failure)
        assert named, f"a failure without a measured figure: {failure}"
        names.append(named.group(1))
    return names


def test_within_every_limit_every_gate_passes() -> None:
    row = gated_row()
    assert (row.gates_passed, row.gate_failures, row.gate_notes) == (True, [], [])
    assert recommend_on_device([row], BOARD, "size", {}) is row


@pytest.mark.parametrize("gate", list(GATE_TABLE))
def test_a_gate_fails_over_its_limit_and_passes_at_it(gate: str) -> None:
    exceeded, at_limit, failure = GATE_TABLE[gate]
    over = gated_row(**exceeded)
    assert not over.gates_passed
    assert failing_gates(over) == [gate] and over.gate_failures[0].startswith(failure)
    assert recommend_on_device([over], BOARD, "size", {}) is None  # a failing row is never recommended
    within = gated_row(**at_limit)
    assert within.gates_passed and within.gate_failures == []


@pytest.mark.parametrize("gates", [*itertools.combinations(GATE_TABLE, 2), tuple(GATE_TABLE)],
                         ids=lambda gates: " + ".join(gates))
def test_one_failing_gate_does_not_hide_another(gates: tuple[str, ...]) -> None:
    figures = {key: value for gate in gates for key, value in GATE_TABLE[gate][0].items()}
    row = gated_row(**figures)
    assert not row.gates_passed and failing_gates(row) == [g for g in GATE_TABLE if g in gates]


def test_the_limits_come_from_the_device() -> None:
    """The figures that fail the 256 MB board's RAM, storage and budget pass on the gateway."""
    figures = {key: value for gate in ("device p95 latency", "peak RSS", "model size")
               for key, value in GATE_TABLE[gate][0].items()}
    assert failing_gates(gated_row(**figures)) == ["device p95 latency", "peak RSS", "model size"]
    assert gated_row(INVENTORY.get("gateway"), **figures).gates_passed


def test_emulated_timings_skip_only_the_latency_gate() -> None:
    row = gated_row(emulated=True, p95_ms=50.0, peak_rss_mb=200.0)
    assert failing_gates(row) == ["peak RSS"]
    assert row.gate_notes == ["p95 latency not gated: measured under emulation (armv7l), not a device timing"]
