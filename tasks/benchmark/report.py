"""Benchmark reports: per-device tables (Markdown, CSV) and the latency-accuracy chart per device with the
Pareto front marked (the MLflow metrics are :func:`tasks.registry.tracking.device_metrics`)."""

from __future__ import annotations

import csv
import io
import math

from edge.files import atomic_write_bytes, atomic_write_text
from tasks.contracts import BenchmarkSummary, DeviceBenchRow, Evaluation, Workspace, write_benchmark
from tasks.evaluation.report import pareto_front

COLUMNS = [("variant", "variant"), ("config", "config"), ("runtime", "runtime"), ("status", "status"),
           ("p50_ms", "p50 ms"), ("p95_ms", "p95 ms"), ("p99_ms", "p99 ms"), ("throughput_ips", "inf/s"),
           ("init_ms", "init ms"), ("peak_rss_bytes", "peak RSS MB"), ("size_bytes", "size KB"),
           ("accuracy", "device acc"), ("accuracy_drop_pts", "drop pts"), ("host_agreement", "agree host"),
           ("energy_mj", "mJ/inf"), ("accelerators", "delegates"), ("fallback", "fell back"),
           ("gates_passed", "gates")]


def _cell(key: str, value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "pass" if value else "fail"
    if isinstance(value, list):
        return ",".join(value) or "-"
    if key == "peak_rss_bytes":
        return f"{value / 2**20:.1f}"
    if key == "size_bytes":
        return f"{value / 1024:.1f}"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def benchmark_markdown(summary: BenchmarkSummary) -> str:
    lines = ["# On-device benchmark", "",
             f"Eval subset: {summary.eval_samples} test samples, classified on each device; the float32 model "
             f"scores {summary.reference_accuracy:.4f} on them (the drop is measured from that). Rows measured "
             "under emulation are marked: their timings are **emulated, not device timings**.", ""]
    for outcome in summary.devices:
        rows = [row for row in summary.rows if row.device == outcome.device]
        title = f"## {outcome.device} ({outcome.runner} runner{', EMULATED' if outcome.emulated else ''})"
        lines += [title, ""]
        if outcome.status != "ok":
            lines += [f"Not benchmarked: {outcome.error}", ""]
            continue
        pick = (f"`{outcome.recommended}` ({outcome.recommended_config})" if outcome.recommended
                else "none: no variant passes every device gate")
        lines += [f"**Recommended for {outcome.device}:** {pick}", "",
                  "| " + " | ".join(title for _, title in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(_cell(key, getattr(row, key)) for key, _ in COLUMNS) + " |" for row in rows]
        problems = [f"- `{row.variant}` ({row.config}): {'; '.join(row.gate_failures + row.gate_notes)}"
                    for row in rows if row.gate_failures or row.gate_notes]
        lines += ["", *problems, ""] if problems else [""]
    return "\n".join(lines)


def per_device_matrix(summary: BenchmarkSummary, evaluation: Evaluation) -> str:
    """The comparison matrix with a column per device: the evaluate stage's host figures (accuracy, size,
    host p95, gates), then each device's p95 and pass/fail."""
    devices = [outcome.device for outcome in summary.devices]
    variants = list(dict.fromkeys(row.variant for row in summary.rows))
    host = ["host acc", "size KB", "host p95 ms", "host gates"]
    lines = ["| variant | " + " | ".join(host + devices) + " |", "|---|" + "---|" * (len(host) + len(devices))]
    for variant in variants:
        measured = evaluation.row(variant)
        cells = [_cell("accuracy", measured.accuracy), _cell("size_bytes", measured.size_bytes),
                 _cell("p95_ms", measured.latency_p95_ms), _cell("gates_passed", measured.gates_passed)]
        for device in devices:
            row = next((r for r in summary.rows if r.device == device and r.variant == variant
                        and r.config == "default"), None)
            if row is None or row.status != "ok":
                cells.append("error")
                continue
            emulated = " (emu)" if row.emulated else ""
            cells.append(f"{row.p95_ms:.2f} ms{emulated} {'pass' if row.gates_passed else 'fail'}")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[DeviceBenchRow], workspace: Workspace) -> None:
    fields = list(DeviceBenchRow.model_fields)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=fields)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("; ".join(v) if isinstance(v, list) else v) for k, v in row.model_dump().items()})
    atomic_write_text(workspace.benchmark_report("csv"), buffer.getvalue())


def write_chart(summary: BenchmarkSummary, workspace: Workspace) -> None:
    """Latency (p95) vs on-device accuracy, one panel per benchmarked device; stars: Pareto front."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [o for o in summary.devices if o.status == "ok"]
    columns = max(1, min(3, len(measured)))
    lines = max(1, math.ceil(len(measured) / columns))
    figure, axes = plt.subplots(lines, columns, figsize=(5.5 * columns, 4.2 * lines), squeeze=False)
    for axis in axes.flat[len(measured):]:
        axis.set_visible(False)
    for axis, outcome in zip(axes.flat, measured):
        rows = [r for r in summary.rows if r.device == outcome.device and r.status == "ok" and r.accuracy is not None]
        points = [(f"{r.variant}/{r.config}", r.p95_ms, r.accuracy) for r in rows]
        front = pareto_front(points)
        for (name, p95, accuracy), row in zip(points, rows):
            star = name in front
            axis.scatter(p95, accuracy * 100, marker="*" if star else "o", s=150 if star else 45,
                         color="tab:green" if row.gates_passed else "tab:red", zorder=3,
                         edgecolors="black" if row.variant == outcome.recommended else "none")
            axis.annotate(name.removesuffix("/default"), (p95, accuracy * 100), fontsize=7, xytext=(4, 3),
                          textcoords="offset points")
        ordered = sorted((p95, accuracy * 100) for name, p95, accuracy in points if name in front)
        if ordered:
            axis.plot(*zip(*ordered), "--", color="grey", linewidth=1)
        axis.set_title(f"{outcome.device}{' (emulated timings)' if outcome.emulated else ''}", fontsize=10)
        axis.set_xlabel("p95 latency (ms)" + (", emulated" if outcome.emulated else ""))
        axis.set_ylabel("on-device accuracy (%)")
        axis.grid(alpha=0.3)
    figure.suptitle("On-device latency vs accuracy (stars: Pareto front, green: passes the device gates, "
                    "black edge: recommended)", fontsize=10)
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format="png", dpi=100)
    plt.close(figure)
    atomic_write_bytes(workspace.benchmark_report("png"), image.getvalue())


def write_benchmark_reports(summary: BenchmarkSummary, evaluation: Evaluation, workspace: Workspace) -> None:
    write_benchmark(workspace, summary)
    write_csv(summary.rows, workspace)
    atomic_write_text(workspace.benchmark_report("md"), benchmark_markdown(summary) + "\n## Comparison matrix with "
                      "device columns (device p95, default configuration)\n\n" + per_device_matrix(summary, evaluation)
                      + "\n")
    write_chart(summary, workspace)
