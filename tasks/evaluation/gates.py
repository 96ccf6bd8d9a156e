"""Quality gates, device fit and the recommendation over measured variant rows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tasks.config import GateParams
from tasks.contracts import DeviceBenchRow, VariantRow
from tasks.devices import MB, DeviceInventory, DeviceSpec, device_fit


def apply_gates(row: VariantRow, gates: GateParams) -> None:
    """Mark ``row`` pass/fail; each failure names the gate, the value and the margin."""
    if row.status != "ok":
        row.gate_failures = [f"not evaluated ({row.status})"]
        return
    checks = [
        ("accuracy", row.accuracy, gates.min_accuracy, "", "min"),
        ("accuracy drop", row.accuracy_drop_pts, gates.max_accuracy_drop_pts, "pts", "max"),
        ("weight reduction", row.weight_reduction, gates.min_weight_reduction, "x", "min"),
        ("size reduction", row.size_reduction, gates.min_size_reduction, "x", "min"),
        ("host p95 latency", row.latency_p95_ms, gates.max_host_latency_ms, "ms", "max"),
    ]
    for name, value, limit, unit, kind in checks:
        if limit is None:  # an optional gate that is switched off
            continue
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
    """Fit or unfit (with the reason) per device, by storage and measured peak RSS."""
    for device in inventory.devices:
        if row.status != "ok":
            row.devices[device.name] = "n/a"
            continue
        fits, reason = device_fit(device, row.size_bytes or 0, row.peak_rss_bytes or 0)
        row.devices[device.name] = "fit" if fits else f"unfit: {reason}"


RANKINGS: dict[str, Callable[[VariantRow], tuple[Any, ...]]] = {
    "size": lambda r: (r.size_bytes, -r.accuracy, r.latency_p95_ms),
    "gzip_size": lambda r: (r.gzip_bytes, -r.accuracy, r.latency_p95_ms),
    "latency": lambda r: (r.latency_p95_ms, -r.accuracy, r.size_bytes),
    "accuracy": lambda r: (-r.accuracy, r.size_bytes, r.latency_p95_ms),
}


def recommend(rows: list[VariantRow], recommend_by: str) -> VariantRow | None:
    """The best row passing every gate by ``recommend_by``; None when nothing passes."""
    passing = [row for row in rows if row.gates_passed]
    return min(passing, key=RANKINGS[recommend_by]) if passing else None


def recommend_per_device(rows: list[VariantRow], inventory: DeviceInventory, recommend_by: str,
                         device_names: list[str] | None = None) -> dict[str, str | None]:
    """For each device (or those named): the best variant that passes the gates and fits it, its preferred
    runtime first; None where nothing fits and passes."""
    picks: dict[str, str | None] = {}
    for device in inventory.devices:
        if device_names and device.name not in device_names:
            continue
        fitting = [row for row in rows if row.gates_passed and row.devices.get(device.name) == "fit"]
        preferred = [row for row in fitting if row.runtime == device.preferred_runtime]
        best = recommend(preferred or fitting, recommend_by)
        picks[device.name] = best.variant if best else None
    return picks


def gate_failure_message(rows: list[VariantRow], gates: GateParams) -> str:
    """Every variant's failing gates and margins, and what to change."""
    active = {"min accuracy": gates.min_accuracy, "max accuracy drop (pts)": gates.max_accuracy_drop_pts,
              "min weight reduction (x)": gates.min_weight_reduction,
              "min size reduction (x)": gates.min_size_reduction,
              "max host p95 latency (ms)": gates.max_host_latency_ms}
    shown = ", ".join(f"{name} {limit}" for name, limit in active.items() if limit is not None)
    lines = [f"no variant passed the quality gates ({shown}):"]
    lines += [f"  - {row.variant}: {'; '.join(row.gate_failures)}" for row in rows]
    lines.append("relax evaluate.gates in params.yaml or improve the model (more epochs, QAT, lower sparsity)")
    return "\n".join(lines)


# ---- on-device gates (benchmark stage) --------------------------------------------------------------

def apply_device_gates(row: DeviceBenchRow, device: DeviceSpec, gates: GateParams, max_rss_fraction: float) -> None:
    """Mark a device row pass/fail: p95 within the device's latency budget (not for emulated timings), peak
    RSS within ``max_rss_fraction`` of its RAM, the file within its storage, on-device accuracy and its drop
    within the quality gates."""
    if row.status != "ok":
        row.gate_failures = [f"not measured: {row.error}"]
        return
    rss_limit = max_rss_fraction * device.ram_mb * MB
    checks: list[tuple[str, float | None, float, str, str]] = [
        ("peak RSS", _mb(row.peak_rss_bytes), rss_limit / MB, "MB", "max"),
        ("model size", _mb(row.size_bytes), float(device.storage_mb), "MB", "max"),
        ("on-device accuracy", row.accuracy, gates.min_accuracy, "", "min"),
        ("on-device accuracy drop", row.accuracy_drop_pts, gates.max_accuracy_drop_pts, "pts", "max"),
    ]
    if row.emulated:
        row.gate_notes.append(f"p95 latency not gated: measured under emulation ({row.arch}), not a device timing")
    else:
        checks.insert(0, ("device p95 latency", row.p95_ms, device.latency_budget_ms, "ms", "max"))
    for name, value, limit, unit, kind in checks:
        if value is None:
            row.gate_failures.append(f"{name}: not measured")
        elif kind == "max" and value > limit:
            row.gate_failures.append(
                f"{name} {value:.2f}{unit} > max {limit:.2f}{unit} (over by {value - limit:.2f}{unit})")
        elif kind == "min" and value < limit:
            row.gate_failures.append(f"{name} {value:.3f} < min {limit}{unit} (short by {limit - value:.3f}{unit})")
    row.gates_passed = not row.gate_failures


def _mb(value: int | None) -> float | None:
    return None if value is None else value / MB


DEVICE_RANKINGS: dict[str, Callable[[DeviceBenchRow, VariantRow | None], tuple[Any, ...]]] = {
    "size": lambda r, h: (r.size_bytes, -(r.accuracy or 0), r.p95_ms),
    "gzip_size": lambda r, h: ((h.gzip_bytes if h and h.gzip_bytes else r.size_bytes), -(r.accuracy or 0), r.p95_ms),
    "latency": lambda r, h: (r.p95_ms, -(r.accuracy or 0), r.size_bytes),
    "accuracy": lambda r, h: (-(r.accuracy or 0), r.size_bytes, r.p95_ms),
}


def recommend_on_device(rows: list[DeviceBenchRow], device: DeviceSpec, recommend_by: str,
                        host_rows: dict[str, VariantRow]) -> DeviceBenchRow | None:
    """The best (variant, configuration) measured on ``device`` that passes every device gate, the device's
    preferred runtime first; None when nothing passes."""
    passing = [row for row in rows if row.device == device.name and row.gates_passed]
    preferred = [row for row in passing if row.runtime == device.preferred_runtime]
    pool = preferred or passing
    if not pool:
        return None
    return min(pool, key=lambda row: DEVICE_RANKINGS[recommend_by](row, host_rows.get(row.variant)))
