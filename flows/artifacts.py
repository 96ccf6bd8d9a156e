"""Prefect artifacts a run publishes: the comparison table, a markdown summary, links."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from tasks.contracts import BenchmarkSummary, Evaluation, Registration, Workspace
from tasks.monitoring.figures import labelled
from tasks.registry.device_choice import DeviceChoice, choices_markdown
from tasks.registry.tracking import run_url

TABLE_COLUMNS = ("variant", "status", "accuracy", "accuracy_drop_pts", "size_bytes", "gzip_bytes", "weight_reduction",
                 "sparsity", "latency_p95_ms", "gates_passed")


def _rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def publish_table(evaluation: Evaluation) -> None:
    create_table_artifact(
        key="variant-comparison",
        table=[{column: _rounded(getattr(row, column)) for column in TABLE_COLUMNS} for row in evaluation.rows],
        description="Every variant measured in its device runtime (host figures)",
    )


def publish_gate_failure(evaluation: Evaluation) -> None:
    """What a data scientist needs when nothing passed: the table and every variant's failing gates."""
    publish_table(evaluation)
    lines = ["# Training run: no variant passed the quality gates", "", f"Gates: `{evaluation.gates}`", ""]
    lines += [f"- `{row.variant}`: {'; '.join(row.gate_failures) or 'passed'}" for row in evaluation.rows]
    lines += ["", "The run is recorded in MLflow as FAILED (params, metrics, reports); nothing was registered."]
    create_markdown_artifact(key="training-summary", markdown="\n".join(lines) + "\n",
                             description="Nothing registered: every variant failed a gate")


def publish_drift_check(summary: dict[str, Any]) -> None:
    """The check's verdict, drifted features with their scores, the decision and the MLflow run with the report."""
    decision = summary.get("decision") or {}
    run = summary.get("mlflow_run")
    lines = [f"# Drift check: window `{summary['window_id']}`", "",
             f"**{summary['status']}** on {summary['rows']} rows ({summary.get('analysed_rows', 0)} tested) from "
             f"{summary['files']} upload(s) of {summary.get('devices', 0)} device(s), against {summary['reference']}.",
             "", f"Trigger: **{'fired' if decision.get('fire') else 'not fired'}**: {decision.get('reason', '-')}", ""]
    lines += [f"- {reason}" for reason in summary["reasons"]] or ["- within every threshold"]
    lines += ["", " · ".join(f"{label}: {value:.3f}" for label, value in labelled(summary))]
    features = summary.get("features") or {}
    if features:
        lines += ["", "| feature | test | score | threshold | drifted |", "|---|---|---|---|---|"]
        for name in sorted(features, key=lambda n: (not features[n]["drifted"], -features[n]["score"])):
            score = features[name]
            lines.append(f"| {name} | {score['method']} | {score['score']:.4g} | {score['threshold']:g} | "
                         f"{'**yes**' if score['drifted'] else 'no'} |")
    prediction = summary.get("prediction")
    if prediction:
        lines += ["", f"Predicted classes: {prediction['method']} {prediction['score']:.4g} (threshold "
                  f"{prediction['threshold']:g}){' **drifted**' if prediction['drifted'] else ''}"]
    if summary.get("quarantined"):
        lines += ["", "Quarantined uploads:", *[f"- `{name}`: {why}" for name, why in summary["quarantined"].items()]]
    is_url = bool(run) and str(run).startswith("http")
    link = f"[MLflow run with the Evidently report]({run})" if is_url else f"MLflow run `{run}`"
    lines += ["", f"{link} (artifact `drift/report.html`)"]
    create_markdown_artifact(key="drift-check", markdown="\n".join(lines) + "\n",
                             description=f"Drift check {summary['window_id']}: {summary['status']}")


def publish_training(evaluation: Evaluation, registration: Registration, choices: list[DeviceChoice],
                     overrides: dict[str, Any]) -> None:
    publish_table(evaluation)
    url = run_url(registration.tracking_uri, registration.experiment_id, registration.run_id)
    run_link = f"[{registration.run_id}]({url})" if url else registration.run_id
    lines = [
        "# Training run", "",
        f"Recommended variant (by {evaluation.recommend_by}): **{evaluation.recommended}**, registered as "
        f"`{registration.registered_model}` version {registration.version} (alias `{registration.alias}`).", "",
        f"Data version: `{registration.data_version}`", "",
        "The release's variant per device class (measured on the devices where the benchmark ran: see the "
        "device-benchmark artifact; otherwise the device's preferred runtime, then the overall recommendation):",
        "", choices_markdown(choices),
        "", f"Parameter overrides: `{overrides or 'none'}`", "",
        f"MLflow run: {run_link} (tracking store `{registration.tracking_uri}`)", "",
        "Load it anywhere: `mlflow.pyfunc.load_model("
        f"\"models:/{registration.registered_model}@{registration.alias}\")`",
    ]
    create_markdown_artifact(key="training-summary", markdown="\n".join(lines) + "\n",
                             description="Recommended variant per device")
    if url:
        create_link_artifact(key="mlflow-run", link=url, link_text="MLflow run")


def publish_images(report: dict[str, Any]) -> None:
    """The packaged images of a version: pinned references, sizes and cold starts (emulated marked)."""
    lines = [f"## Images of {report['model_name']} version {report['mlflow_version']}: {report['version']}", "",
             f"{report['version_reason']}", "", "| platform | image | MB | ready (s) | status |",
             "|---|---|---|---|---|"]
    for image in report["images"]:
        repository = image["reference"].rsplit(":", 1)[0]
        pinned = f"{repository}@{image['digest']}" if image["digest"] else image["reference"]
        ready = "" if image["ready_s"] is None else f"{image['ready_s']:.2f}" + (" (emulated)" if image["emulated"]
                                                                                  else "")
        size = "" if image["image_mb"] is None else f"{image['image_mb']:.1f}"
        lines.append(f"| {image['platform']} | `{pinned}` | {size} | {ready} | {image['status']} |")
    create_markdown_artifact(key="images", markdown="\n".join(lines) + "\n",
                             description="edge images pushed for this model version")


BENCHMARK_COLUMNS = ("device", "variant", "config", "status", "emulated", "p50_ms", "p95_ms", "accuracy",
                     "accuracy_drop_pts", "host_agreement", "peak_rss_bytes", "energy_mj", "gates_passed", "error")


def publish_benchmark(summary: BenchmarkSummary, workspace: Workspace) -> None:
    """The on-device benchmark: the per-device report (recommendations, gates) and every row as a table."""
    create_markdown_artifact(key="device-benchmark", markdown=workspace.benchmark_report("md").read_text(),
                             description="Every candidate measured on every device (emulated timings marked)")
    create_table_artifact(key="device-benchmark-rows", description="On-device benchmark rows",
                          table=[{column: _rounded(getattr(row, column)) for column in BENCHMARK_COLUMNS}
                                 for row in summary.rows])
