"""Quality gates, device fit and the recommendation over measured variant rows."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from tasks.config import GateParams
from tasks.contracts import DeviceBenchRow, VariantRow
from tasks.devices import MB, DeviceInventory, DeviceSpec, device_fit


@dataclass(frozen=True)
class Gate:
    """One gate: a measured figure held against a limit, and how its failure reads.

    ``limit`` None is a gate switched off. ``digits`` are the decimals of the figure and the margin;
    ``limit_digits`` those of the limit (None: the limit as configured).
    """

    name: str
    value: float | None
    limit: float | None
    unit: str = ""
    kind: Literal["min", "max"] = "max"
    digits: int = 2
    limit_digits: int | None = None

    def failure(self) -> str | None:
        """Why the figure fails the gate (the figure, the limit and the margin), or None when it passes."""
        if self.limit is None:
            return None
        if self.value is None:
            return f"{self.name}: not measured"
        failed = self.value > self.limit if self.kind == "max" else self.value < self.limit
        if not failed:
            return None
        sign, margin = (">", "over by") if self.kind == "max" else ("<", "short by")
        limit = f"{self.limit}" if self.limit_digits is None else f"{self.limit:.{self.limit_digits}f}"
        return (f"{self.name} {self.value:.{self.digits}f}{self.unit} {sign} {self.kind} {limit}{self.unit} "
                f"({margin} {abs(self.value - self.limit):.{self.digits}f}{self.unit})")


def judge(row: VariantRow | DeviceBenchRow, gates: Iterable[Gate]) -> None:
    """Record every failing gate on ``row`` (one failure never hides another) and whether all passed."""
    row.gate_failures.extend(failure for gate in gates if (failure := gate.failure()) is not None)
    row.gates_passed = not row.gate_failures


def apply_gates(row: VariantRow, gates: GateParams) -> None:
    """Mark ``row`` pass/fail; each failure names the gate, the value and the margin."""
    if row.status != "ok":
        row.gate_failures = [f"not evaluated ({row.status})"]
        return
    judge(row, [
        Gate("accuracy", row.accuracy, gates.min_accuracy, kind="min"),
        Gate("accuracy drop", row.accuracy_drop_pts, gates.max_accuracy_drop_pts, "pts"),
        Gate("weight reduction", row.weight_reduction, gates.min_weight_reduction, "x", "min"),
        Gate("size reduction", row.size_reduction, gates.min_size_reduction, "x", "min"),
        Gate("host p95 latency", row.latency_p95_ms, gates.max_host_latency_ms, "ms"),
    ])


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
    "bundle_bytes": lambda r: (r.bundle_bytes, -r.accuracy, r.latency_p95_ms),
    "latency": lambda r: (r.latency_p95_ms, -r.accuracy, r.size_bytes),
    "accuracy": lambda r: (-r.accuracy, r.size_bytes, r.latency_p95_ms),
}


def recommend(rows: list[VariantRow], recommend_by: str) -> VariantRow | None:
    """The best row passing every gate by ``recommend_by``; None when nothing passes."""
    passing = [row for row in rows if row.gates_passed]
    return min(passing, key=RANKINGS[recommend_by]) if passing else None


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
    checks = [
        Gate("peak RSS", _mb(row.peak_rss_bytes), max_rss_fraction * device.ram_mb, "MB", limit_digits=2),
        Gate("model size", _mb(row.size_bytes), float(device.storage_mb), "MB", limit_digits=2),
        Gate("on-device accuracy", row.accuracy, gates.min_accuracy, kind="min", digits=3),
        Gate("on-device accuracy drop", row.accuracy_drop_pts, gates.max_accuracy_drop_pts, "pts", limit_digits=2),
    ]
    if row.emulated:
        row.gate_notes.append(f"p95 latency not gated: measured under emulation ({row.arch}), not a device timing")
    else:
        checks.insert(0, Gate("device p95 latency", row.p95_ms, device.latency_budget_ms, "ms", limit_digits=2))
    judge(row, checks)


def _mb(value: int | None) -> float | None:
    return None if value is None else value / MB


DEVICE_RANKINGS: dict[str, Callable[[DeviceBenchRow, VariantRow | None], tuple[Any, ...]]] = {
    "size": lambda r, h: (r.size_bytes, -(r.accuracy or 0), r.p95_ms),
    "gzip_size": lambda r, h: ((h.gzip_bytes if h and h.gzip_bytes else r.size_bytes), -(r.accuracy or 0), r.p95_ms),
    "bundle_bytes": lambda r, h: ((h.bundle_bytes if h and h.bundle_bytes else r.size_bytes), -(r.accuracy or 0),
                                  r.p95_ms),
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
