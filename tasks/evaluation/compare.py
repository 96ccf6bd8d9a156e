"""Challenger vs champion on the same evaluation sets, for the human approval gate.

Both model files run through :mod:`edge.runtime` on the frozen test set and, when present, on newly
labelled device data; sizes, host latency and device fit are reported side by side.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.measure import measure_latency, memory_footprint_in_fresh_process
from edge.runtime import EdgeModel
from edge.sidecar import read_sidecar
from tasks.config import EvaluateParams
from tasks.contracts import Dataset
from tasks.devices import DeviceInventory, device_fit


@dataclass
class ModelScore:
    role: str  # challenger | champion
    version: str
    variant: str
    data_version: str
    size_bytes: int
    latency_p95_ms: float
    accuracy: dict[str, float] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)
    # measured on the devices by the benchmark stage of the version's run: device -> {p95_ms, accuracy, ...}
    on_device: dict[str, dict[str, float]] = field(default_factory=dict)


def score_model(role: str, version: str, path: Path, datasets: dict[str, Dataset], inventory: DeviceInventory,
                measurement: EvaluateParams) -> ModelScore:
    """Accuracy on each set, host p95 latency (the evaluate stage's settings) and device fit of one model file."""
    model = EdgeModel.load(path)  # checks the file against its sidecar's sha256 first
    sidecar = read_sidecar(path)
    first = next(iter(datasets.values()))
    latency = measure_latency(model, first.x[0], measurement.latency_warmup_runs, measurement.latency_runs)
    score = ModelScore(role, version, sidecar.get("variant", "?"), sidecar.get("data_version", "?"),
                       path.stat().st_size, latency.p95_ms)
    for name, data in datasets.items():
        score.accuracy[name] = float(np.mean(np.argmax(model.predict(data.x), axis=1) == data.y))
    peak_rss = memory_footprint_in_fresh_process(path)["peak_rss_bytes"]
    for device in inventory.devices:
        fits, reason = device_fit(device, score.size_bytes, peak_rss)
        score.devices[device.name] = "fit" if fits else f"unfit: {reason}"
    return score


def compare(challenger: ModelScore, champion: ModelScore | None) -> dict[str, Any]:
    """Side-by-side record with accuracy deltas (challenger minus champion, in points)."""
    deltas = {}
    if champion is not None:
        deltas = {name: 100.0 * (challenger.accuracy[name] - champion.accuracy.get(name, float("nan")))
                  for name in challenger.accuracy}
    return {"challenger": asdict(challenger), "champion": asdict(champion) if champion else None,
            "accuracy_delta_pts": deltas}


def _on_device_cell(score: dict[str, Any], device: str) -> str:
    figures = score.get("on_device", {}).get(device)
    if not figures:
        return "not benchmarked"
    accuracy = "-" if figures.get("accuracy") is None else f"{figures['accuracy']:.4f}"
    return f"p95 {figures.get('p95_ms', float('nan')):.3f} ms, accuracy {accuracy}"


def comparison_markdown(comparison: dict[str, Any], links: dict[str, str]) -> str:
    challenger, champion = comparison["challenger"], comparison["champion"]
    lines = ["# Retrain: challenger vs champion", ""]
    if champion is None:
        lines += ["No champion yet: approving makes this version the first champion.", ""]
    columns = [c for c in (challenger, champion) if c]
    lines += ["| | " + " | ".join(f"{c['role']} (v{c['version']})" for c in columns) + " |",
              "|---|" + "---|" * len(columns),
              "| variant | " + " | ".join(c["variant"] for c in columns) + " |",
              "| data version | " + " | ".join(f"`{c['data_version']}`" for c in columns) + " |",
              "| size (B) | " + " | ".join(str(c["size_bytes"]) for c in columns) + " |",
              "| host p95 latency (ms) | " + " | ".join(f"{c['latency_p95_ms']:.3f}" for c in columns) + " |"]
    for name in challenger["accuracy"]:
        lines.append(f"| accuracy on {name} | " + " | ".join(
            f"{c['accuracy'].get(name, float('nan')):.4f}" for c in columns) + " |")
    for device in challenger["devices"]:
        lines.append(f"| {device} | " + " | ".join(c["devices"].get(device, "-") for c in columns) + " |")
    for device in sorted({d for c in columns for d in c.get("on_device", {})}):
        lines.append(f"| on {device} | " + " | ".join(_on_device_cell(c, device) for c in columns) + " |")
    if comparison["accuracy_delta_pts"]:
        lines += ["", "Accuracy change (points): " + ", ".join(
            f"{name} {delta:+.2f}" for name, delta in comparison["accuracy_delta_pts"].items())]
    data_changed = champion is not None and champion["data_version"] != challenger["data_version"]
    lines += ["", f"Data diff: {'new data version' if data_changed else 'same data version as the champion'}"]
    lines += ["", "Links: " + ", ".join(f"[{name}]({url})" for name, url in links.items())]
    lines += ["", "Resume this run with **approve**, **reviewer** and **comment** to decide."]
    return "\n".join(lines) + "\n"
