"""Challenger vs champion on the same evaluation sets, for the human approval gate.

Both model files run through :mod:`edge.runtime` on the champion's frozen test set, on this run's test
split when it differs, and on newly labelled device data when present: accuracy overall and per class
(recall), sizes, host latency and device fit side by side. A challenger that loses more than
``retrain.max_frozen_drop_pts`` on the frozen test set is flagged in red for the reviewer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.bench.measure import measure_latency, memory_footprint_in_fresh_process
from edge.runtime import EdgeModel
from edge.sidecar import read_sidecar
from tasks.config import EvaluateParams
from tasks.contracts import Dataset
from tasks.devices import DeviceInventory, device_fit

FROZEN_SET = "frozen test set"  # the champion's (or, without one, this version's) test split as registered
CURRENT_SET = "current test split"  # this run's test split, when it differs from the frozen one
LABELLED_SET = "newly labelled"  # held-out newly labelled device samples

@dataclass
class ModelScore:
    role: str  # challenger | champion
    version: str
    variant: str
    data_version: str
    size_bytes: int
    latency_p95_ms: float
    accuracy: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)  # set -> samples scored
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # set -> label -> recall (classes present)
    class_samples: dict[str, dict[str, int]] = field(default_factory=dict)  # set -> label -> samples
    devices: dict[str, str] = field(default_factory=dict)
    # measured on the devices by the benchmark stage of the version's run: device -> {p95_ms, accuracy, ...}
    on_device: dict[str, dict[str, float]] = field(default_factory=dict)


def class_recall(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> tuple[dict[str, float],
                                                                                 dict[str, int]]:
    """Accuracy within each class (recall) and its sample count; classes absent from ``y_true`` are left out."""
    recall, counts = {}, {}
    for index, label in enumerate(labels):
        members = y_true == index
        if members.any():
            recall[label] = float(np.mean(y_pred[members] == index))
            counts[label] = int(members.sum())
    return recall, counts


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
        predicted = np.argmax(model.predict(data.x), axis=1)
        score.accuracy[name] = float(np.mean(predicted == data.y))
        score.samples[name] = len(data.y)
        score.per_class[name], score.class_samples[name] = class_recall(data.y, predicted, data.labels)
    peak_rss = memory_footprint_in_fresh_process(path)["peak_rss_bytes"]
    for device in inventory.devices:
        fits, reason = device_fit(device, score.size_bytes, peak_rss)
        score.devices[device.name] = "fit" if fits else f"unfit: {reason}"
    return score


def _points(challenger: float, champion: float | None) -> float:
    return 100.0 * (challenger - (float("nan") if champion is None else champion))


def compare(challenger: ModelScore, champion: ModelScore | None, *, max_frozen_drop_pts: float,
            sets: dict[str, str] | None = None, notes: list[str] | None = None) -> dict[str, Any]:
    """Side-by-side record with accuracy deltas (challenger minus champion, in points) per set and per class.

    Args:
        max_frozen_drop_pts: the most the challenger may lose on :data:`FROZEN_SET` before it is flagged.
        sets: what each evaluation set is (origin, md5), for the reviewer.
        notes: anything the reviewer must know about the sets (a fallback, a label mismatch).

    Returns:
        ``challenger``/``champion`` (the scores), ``accuracy_delta_pts`` (set -> points),
        ``per_class_delta_pts`` (set -> label -> points), ``sets``, ``notes`` and ``frozen_regression``
        (``flagged``, ``drop_pts``: champion minus challenger on the frozen set, 0.0 without a champion,
        ``max_drop_pts``).
    """
    deltas: dict[str, float] = {}
    class_deltas: dict[str, dict[str, float]] = {}
    if champion is not None:
        deltas = {name: _points(accuracy, champion.accuracy.get(name)) for name, accuracy in
                  challenger.accuracy.items()}
        class_deltas = {name: {label: _points(recall, champion.per_class.get(name, {}).get(label))
                               for label, recall in classes.items()}
                        for name, classes in challenger.per_class.items()}
    drop_pts = -deltas[FROZEN_SET] if FROZEN_SET in deltas else 0.0
    # 1e-9: a drop of exactly the gate stays within it despite float rounding; NaN (not scored) never flags
    flagged = bool(drop_pts > max_frozen_drop_pts + 1e-9)
    return {"challenger": asdict(challenger), "champion": asdict(champion) if champion else None,
            "accuracy_delta_pts": deltas, "per_class_delta_pts": class_deltas, "sets": dict(sets or {}),
            "notes": list(notes or []),
            "frozen_regression": {"flagged": flagged, "drop_pts": drop_pts, "max_drop_pts": max_frozen_drop_pts}}


def _on_device_cell(score: dict[str, Any], device: str) -> str:
    figures = score.get("on_device", {}).get(device)
    if not figures:
        return "not benchmarked"
    accuracy = "-" if figures.get("accuracy") is None else f"{figures['accuracy']:.4f}"
    return f"p95 {figures.get('p95_ms', float('nan')):.3f} ms, accuracy {accuracy}"


def _regression_lines(regression: dict[str, Any]) -> list[str]:
    """The red flag (HTML colour where the renderer keeps it, the emoji and bold where it does not)."""
    if not regression["flagged"]:
        return []
    return [f'<span style="color:red">**🔴 ⚠ Frozen test set regression: the challenger is '
            f'{regression["drop_pts"]:.2f} points below the champion on the champion\'s frozen test set '
            f'(gate: at most {regression["max_drop_pts"]:.2f} points, retrain.max_frozen_drop_pts).**</span>', ""]


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _per_class_lines(comparison: dict[str, Any], columns: list[dict[str, Any]]) -> list[str]:
    """One table per evaluation set: samples, each model's recall and the change, per class."""
    challenger = comparison["challenger"]
    lines = ["", "## Accuracy per class (recall)"]
    for name, counts in challenger["class_samples"].items():
        deltas = comparison["per_class_delta_pts"].get(name, {})
        lines += ["", f"**{name}**", "",
                  "| class | samples | " + " | ".join(c["role"] for c in columns)
                  + (" | change (pts) |" if deltas else " |"),
                  "|---|---|" + "---|" * (len(columns) + bool(deltas))]
        for label, count in counts.items():
            cells = [_cell(c["per_class"].get(name, {}).get(label), ".4f") for c in columns]
            change = [_cell(deltas.get(label), "+.2f")] if deltas else []
            lines.append(f"| {label} | {count} | " + " | ".join(cells + change) + " |")
    return lines


def comparison_markdown(comparison: dict[str, Any], links: dict[str, str]) -> str:
    challenger, champion = comparison["challenger"], comparison["champion"]
    regression = comparison.get("frozen_regression", {"flagged": False})
    lines = ["# Retrain: challenger vs champion", "", *_regression_lines(regression)]
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
        samples = challenger.get("samples", {}).get(name)
        lines.append(f"| accuracy on {name}{f' (n={samples})' if samples else ''} | " + " | ".join(
            f"{c['accuracy'].get(name, float('nan')):.4f}" for c in columns) + " |")
    for device in challenger["devices"]:
        lines.append(f"| {device} | " + " | ".join(c["devices"].get(device, "-") for c in columns) + " |")
    for device in sorted({d for c in columns for d in c.get("on_device", {})}):
        lines.append(f"| on {device} | " + " | ".join(_on_device_cell(c, device) for c in columns) + " |")
    if comparison.get("release_table"):  # the challenger's variant per device class (tasks.registry.device_choice)
        lines += ["", "The challenger's variant per device class, and what chose it:", "", comparison["release_table"]]
    if comparison.get("sets"):
        lines += ["", "Evaluation sets:"] + [f"- **{name}**: {what}" for name, what in comparison["sets"].items()]
    if comparison.get("notes"):
        lines += ["", "Notes:"] + [f"- {note}" for note in comparison["notes"]]
    if comparison["accuracy_delta_pts"]:
        lines += ["", "Accuracy change (points): " + ", ".join(
            f"{name} {delta:+.2f}" for name, delta in comparison["accuracy_delta_pts"].items())]
    if champion is not None and "max_drop_pts" in regression:
        verdict = "**over the gate**" if regression["flagged"] else "within the gate"
        lines += ["", f"Frozen test set gate: challenger {-regression['drop_pts']:+.2f} points vs the champion "
                      f"(a loss of more than {regression['max_drop_pts']:.2f} is flagged): {verdict}"]
    if challenger.get("per_class"):
        lines += _per_class_lines(comparison, columns)
    data_changed = champion is not None and champion["data_version"] != challenger["data_version"]
    lines += ["", f"Data diff: {'new data version' if data_changed else 'same data version as the champion'}"]
    lines += ["", "Links: " + ", ".join(f"[{name}]({url})" for name, url in links.items())]
    lines += ["", "Resume this run with **approve**, **reviewer** and **comment** to decide."]
    return "\n".join(lines) + "\n"
