"""Comparison reports of the variant matrix: CSV, Markdown, a Pareto plot and DVC metrics."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from edge.files import atomic_write_bytes, atomic_write_text
from tasks.contracts import Evaluation, VariantRow, Workspace, write_evaluation

COLUMNS = [
    ("variant", "variant"), ("status", "status"), ("runtime", "runtime"), ("method", "method"),
    ("accuracy", "test acc"), ("accuracy_drop_pts", "drop (pts)"), ("agreement", "agree fp32"),
    ("max_abs_diff", "max |diff|"), ("size_bytes", "size (B)"), ("gzip_bytes", "gzip (B)"),
    ("weight_bytes", "weights (B)"), ("size_reduction", "x smaller"),
    ("weight_reduction", "x fewer weight B"),
    ("bundle_bytes", "bundle (B)"), ("fleet_bytes", "fleet rollout (B)"),
    ("sparsity", "sparsity"), ("file_sparsity", "file sparsity"), ("max_distinct_weights", "max distinct w"),
    ("latency_p50_ms", "p50 ms"), ("latency_p95_ms", "p95 ms"),
    ("model_rss_bytes", "model RSS (B)"),
    ("peak_rss_bytes", "peak RSS (B)"), ("gates_passed", "gates"),
]


def pareto_front(points: list[tuple[str, float, float]]) -> set[str]:
    """Names of points not dominated on (cost lower is better, accuracy higher is better)."""
    front = set()
    for name, cost, accuracy in points:
        dominated = any(c <= cost and a >= accuracy and (c < cost or a > accuracy) for _, c, a in points)
        if not dominated:
            front.add(name)
    return front


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def comparison_markdown(evaluation: Evaluation) -> str:
    rows = evaluation.rows
    lines = ["# Variant comparison", "",
             "Measured on this host in each variant's device runtime (LiteRT / ONNX Runtime); "
             "latency and RSS are host figures, not device timings.", "",
             "| " + " | ".join(title for _, title in COLUMNS) + " |",
             "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(getattr(row, key) if row.status == "ok" or key != "gates_passed" else None)
                                for key, _ in COLUMNS) + " |" for row in rows]
    lines += ["", f"**Recommended** (by {evaluation.recommend_by}): `{evaluation.recommended}`", "",
              "## Gate results"]
    for row in rows:
        if row.status != "ok":
            lines.append(f"- `{row.variant}`: {row.status}: {row.error}")
            continue
        verdict = "pass" if row.gates_passed else "fail: " + "; ".join(row.gate_failures)
        lines.append(f"- `{row.variant}`: {verdict}")
    lines += ["", "## Device fit (storage and measured peak RSS)"]
    for row in rows:
        lines.append(f"- `{row.variant}`: " + ", ".join(f"{d}: {v}" for d, v in row.devices.items()))
    return "\n".join(lines) + "\n"


def write_csv(rows: list[VariantRow], path: Path) -> None:
    fields = [key for key, _ in COLUMNS] + ["gate_failures", "error"] + [f"device_{d}" for d in rows[0].devices]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        flat = {key: getattr(row, key) for key, _ in COLUMNS}
        flat.update(gate_failures="; ".join(row.gate_failures), error=row.error)
        flat.update({f"device_{d}": v for d, v in row.devices.items()})
        writer.writerow(flat)
    atomic_write_text(path, buffer.getvalue())


def write_plot(rows: list[VariantRow], recommended: str | None, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [row for row in rows if row.status == "ok"]
    panels = (("size_bytes", "size on disk (KiB)", 1024.0), ("gzip_bytes", "gzip size, OTA download (KiB)", 1024.0),
              ("latency_p50_ms", "host latency p50 (ms)", 1.0))
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4.8))
    label_offsets = ((4, 4), (4, -10), (-40, 8), (-40, -12))  # stagger labels of points that sit together
    colours = {row.variant: plt.cm.tab10(index % 10) for index, row in enumerate(rows)}  # same in every panel
    for axis, (key, label, scale) in zip(axes, panels):
        points = [(row.variant, getattr(row, key), row.accuracy) for row in measured]
        front = pareto_front(points)
        for index, (name, cost, accuracy) in enumerate(sorted(points, key=lambda p: p[1])):
            on_front = name in front
            axis.scatter(cost / scale, accuracy * 100, marker="*" if on_front else "o", s=160 if on_front else 50,
                         color=colours[name],
                         edgecolors="red" if name == recommended else "none", linewidths=2, zorder=3)
            axis.annotate(name, (cost / scale, accuracy * 100), fontsize=7,
                          xytext=label_offsets[index % len(label_offsets)], textcoords="offset points")
        ordered = sorted((cost / scale, accuracy * 100) for name, cost, accuracy in points if name in front)
        if ordered:
            axis.plot(*zip(*ordered), "--", color="grey", linewidth=1, label="Pareto front")
            axis.legend(loc="lower right")
        axis.set_xlabel(label)
        axis.set_ylabel("test accuracy (%)")
        axis.grid(alpha=0.3)
    figure.suptitle(f"Variant matrix (stars: Pareto front, red edge: recommended {recommended})")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, image.getvalue())


def metrics(evaluation: Evaluation) -> dict[str, Any]:
    """Flat numbers for ``dvc metrics``: each measured variant plus the recommendation."""
    keys = ("accuracy", "accuracy_drop_pts", "size_bytes", "gzip_bytes", "latency_p95_ms")
    recommended = evaluation.row(evaluation.recommended) if evaluation.recommended else None
    return {"recommended": evaluation.recommended,
            "recommended_accuracy": recommended.accuracy if recommended else None,
            "recommended_gzip_bytes": recommended.gzip_bytes if recommended else None,
            "variants": {row.variant: {k: getattr(row, k) for k in keys} for row in evaluation.rows
                         if row.status == "ok"}}


def write_reports(evaluation: Evaluation, workspace: Workspace) -> None:
    """The evaluation record, its DVC metrics and the human-readable comparison (md, csv, png)."""
    workspace.reports_dir.mkdir(parents=True, exist_ok=True)
    write_evaluation(workspace, evaluation)
    atomic_write_text(workspace.metrics_file, json.dumps(metrics(evaluation), indent=2) + "\n")
    atomic_write_text(workspace.comparison_file("md"), comparison_markdown(evaluation))
    write_csv(evaluation.rows, workspace.comparison_file("csv"))
    write_plot(evaluation.rows, evaluation.recommended, workspace.comparison_file("png"))
