"""MLflow lineage: one run per pipeline execution with params, metrics, reports and every model file.

The tracking URI comes from ``MLFLOW_TRACKING_URI`` when set, else from ``mlflow.tracking_uri`` in
params (a local SQLite store by default, no server needed). Nothing here runs on import; entry
points call :func:`configure`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.cli import StageError
from tasks.config import MlflowParams, Params

log = logging.getLogger(__name__)
VARIANT_METRICS = ("accuracy", "accuracy_drop_pts", "agreement", "max_abs_diff", "size_bytes", "gzip_bytes",
                   "size_reduction", "sparsity", "latency_p50_ms", "latency_p95_ms", "model_rss_bytes",
                   "peak_rss_bytes")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    experiment_id: str
    artifact_uri: str
    tracking_uri: str


def tracking_uri(params: MlflowParams) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or params.tracking_uri


def configure(params: MlflowParams) -> str:
    """Point MLflow at the configured store; fail fast with a clear message when it is unreachable."""
    import mlflow

    uri = tracking_uri(params)
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as error:
        raise StageError(f"MLflow tracking store {uri} is unreachable ({type(error).__name__}: {error}); "
                         "start the server or set MLFLOW_TRACKING_URI to one that answers") from error
    return uri


def ensure_experiment(params: MlflowParams) -> str:
    """The experiment's id, creating it (with a local artifact root for local stores) when missing."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.experiment)
    if experiment is not None:
        return experiment.experiment_id
    local_store = tracking_uri(params).startswith(("sqlite:", "file:", "/"))
    location = Path(params.artifact_root).resolve().as_uri() if local_store else None
    return client.create_experiment(params.experiment, artifact_location=location)


def variant_metrics(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {f"{row['variant']}.{key}": float(row[key]) for row in rows if row["status"] == "ok"
            for key in VARIANT_METRICS if row.get(key) is not None}


@contextmanager
def pipeline_run(params: Params, evaluation: dict[str, Any], train_summary: dict[str, Any],
                 lineage: dict[str, Any], extra_tags: dict[str, str] | None = None) -> Iterator[RunRecord]:
    """Log one run (flattened params, lineage tags, per-variant metrics, reports, model files) and stay in it.

    Work done inside the ``with`` block (registration) belongs to the run: when it raises, the run
    ends FAILED instead of looking like a finished run that registered nothing.
    """
    import mlflow

    experiment_id = ensure_experiment(params.mlflow)
    report_dir, variant_dir = Path(params.evaluate.output_dir), Path(params.convert.output_dir)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params(params.flat())
        mlflow.set_tags({"data_version": lineage["data_version"], "git_commit": lineage["git_commit"],
                         "params_hash": lineage["params_hash"], "zoo_model": params.train.model,
                         "recommended_variant": str(evaluation["recommended"]),
                         "quantize.strategy": params.quantize.strategy, **(extra_tags or {})})
        mlflow.log_metrics({"baseline.val_accuracy": train_summary["baseline"]["val_accuracy"],
                            "baseline.test_accuracy": train_summary["baseline"]["test_accuracy"],
                            "ptq_check.drop_pts": train_summary["ptq_check"]["drop_pts"],
                            **variant_metrics(evaluation["rows"])})
        for name in ("comparison.csv", "comparison.md", "comparison.png", "evaluation.json"):
            mlflow.log_artifact(str(report_dir / name), "reports")
        mlflow.log_dict(train_summary, "reports/train_summary.json")
        for model_file in sorted(variant_dir.glob("*")):
            if model_file.suffix in (".tflite", ".onnx") or model_file.name.endswith((".tflite.json", ".onnx.json")):
                variant = model_file.name.split(".")[0]
                mlflow.log_artifact(str(model_file), f"models/{variant}")
        yield RunRecord(run.info.run_id, experiment_id, run.info.artifact_uri, mlflow.get_tracking_uri())


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI address of a run, when the store is a server (None for a local store)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
