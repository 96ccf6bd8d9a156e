"""The drift check's headline figures, defined once: where each is published and what it means.

A check's summary (``summary.json``, :meth:`tasks.monitoring.check.CheckOutcome.summary`) is the one
record; every figure reads its value from it. From the table :data:`FIGURES` come

- the Prometheus text for node_exporter's textfile collector (:func:`prometheus_text`): the figures with
  a ``prometheus`` gauge name, under their HELP text;
- the MLflow metrics of the check's run (:func:`mlflow_metrics`): the figures marked ``mlflow``;
- the payload of the ``edgeloop.drift.detected`` event (:func:`event_payload`): the figures marked ``event``;
- the figures line of the Prefect artifact (:func:`labelled`): the figures with a ``label``.

A figure whose value is None (no decision yet, no prediction test on a small window) is left out of
the numeric exports rather than written as 0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

Summary = Mapping[str, Any]
Kind = Literal["text", "number", "count", "flag"]  # as a number: none, itself, its length, 1 or 0


def _key(name: str) -> Callable[[Summary], Any]:
    return lambda summary: summary[name]


@dataclass(frozen=True)
class DriftFigure:
    name: str                      # key in the event payload; MLflow metric name; the summary's key unless ``read``
    help: str                      # what it means: the Prometheus HELP text
    kind: Kind = "number"
    prometheus: str | None = None  # gauge name in the textfile (None: not exported there)
    mlflow: bool = False           # an MLflow metric of the check's run
    event: bool = False            # in the edgeloop.drift.detected payload (as the summary records it)
    label: str | None = None       # its name in the artifact's figures line
    read: Callable[[Summary], Any] | None = None  # its value in the summary (default: the summary's ``name``)

    def value(self, summary: Summary) -> Any:
        return (self.read or _key(self.name))(summary)

    def number(self, summary: Summary) -> float | None:
        """The figure as a metric value; None when it was not measured (or is text)."""
        value = self.value(summary)
        if value is None or self.kind == "text":
            return None
        if self.kind == "count":
            return len(value)
        return int(bool(value)) if self.kind == "flag" else value


FIGURES: tuple[DriftFigure, ...] = (
    DriftFigure("window_id", "the window's id", "text", event=True),
    DriftFigure("status", "drift, ok, too_small or invalid", "text", event=True),
    DriftFigure("reasons", "why drift, too_small or invalid", "text", event=True),
    DriftFigure("rows", "rows in the newest window", prometheus="edgeloop_drift_window_rows", mlflow=True,
                event=True),
    DriftFigure("mean_confidence", "mean top-class confidence", prometheus="edgeloop_drift_mean_confidence",
                mlflow=True, event=True, label="mean confidence"),
    DriftFigure("latency_p95_ms", "device latency p95 (ms)", prometheus="edgeloop_drift_latency_p95_ms",
                mlflow=True, event=True, label="latency p95 (ms)"),
    DriftFigure("drift_share", "share of feature columns drifted", prometheus="edgeloop_drift_share", mlflow=True,
                event=True, label="share of features drifted"),
    DriftFigure("dataset_drift", "1 when the dataset drifted", "flag", prometheus="edgeloop_drift_dataset_drift"),
    DriftFigure("drifted_features", "feature columns drifted, most drifted first", "count", mlflow=True,
                event=True),
    DriftFigure("prediction_score", "predicted-class drift score", prometheus="edgeloop_drift_prediction_score",
                mlflow=True, read=lambda summary: summary["prediction"] and summary["prediction"]["score"]),
    DriftFigure("exceeded", "1 when the window exceeded the thresholds", "flag", prometheus="edgeloop_drift_exceeded",
                mlflow=True, read=lambda summary: summary["status"] == "drift"),
    DriftFigure("invalid", "1 when the window was invalid", "flag", prometheus="edgeloop_drift_invalid",
                read=lambda summary: summary["status"] == "invalid"),
    DriftFigure("streak", "consecutive exceeded windows", prometheus="edgeloop_drift_streak", mlflow=True,
                read=lambda summary: summary["decision"] and summary["decision"]["streak"]),
    DriftFigure("triggered", "1 when this check started a retrain", "flag", prometheus="edgeloop_drift_triggered",
                mlflow=True, read=_key("drift_detected")),
    DriftFigure("quarantined_files", "uploads quarantined by this check", "count",
                prometheus="edgeloop_drift_quarantined_files", mlflow=True, read=_key("quarantined")),
    DriftFigure("duplicates", "rows dropped as already seen", mlflow=True),
    DriftFigure("reference", "the reference compared with (champion vN, or a file)", "text", event=True),
    DriftFigure("decision", "the trigger policy's decision", "text", event=True),
    DriftFigure("window_file", "the window file written", "text", event=True),
    DriftFigure("mlflow_run", "the check's MLflow run (URL, else id)", "text", event=True),
)


def prometheus_text(summary: Summary) -> str:
    """The headline figures in Prometheus' text format (for node_exporter's textfile collector)."""
    from prometheus_client import CollectorRegistry, Gauge, generate_latest

    registry = CollectorRegistry()
    for figure in FIGURES:
        value = figure.number(summary)
        if figure.prometheus and value is not None:
            Gauge(figure.prometheus, figure.help, registry=registry).set(value)
    return generate_latest(registry).decode()


def mlflow_metrics(summary: Summary) -> dict[str, float]:
    """The figures of the check's MLflow run, with each tested feature's score as ``feature.<name>``."""
    metrics = {figure.name: figure.number(summary) for figure in FIGURES if figure.mlflow}
    metrics |= {f"feature.{name}": score["score"] for name, score in (summary.get("features") or {}).items()}
    return {name: value for name, value in metrics.items() if value is not None}


def event_payload(summary: Summary) -> dict[str, Any]:
    """What the ``edgeloop.drift.detected`` event carries (the retrain flow receives it as ``drift_summary``)."""
    return {figure.name: figure.value(summary) for figure in FIGURES if figure.event}


def labelled(summary: Summary) -> list[tuple[str, float]]:
    """The artifact's headline figures, (label, value), those measured."""
    figures = [(figure.label, figure.number(summary)) for figure in FIGURES if figure.label]
    return [(label, value) for label, value in figures if value is not None]
