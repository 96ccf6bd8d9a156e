"""MLflow lineage: one run per pipeline execution with params, metrics, reports and every model file.

The tracking URI is ``mlflow.tracking_uri`` in params (a local SQLite store by default, no server needed;
``MLFLOW_TRACKING_URI`` overrides it when the config is loaded, :data:`tasks.config.ENVIRONMENT`). Nothing
here runs on import; entry points call :func:`configure`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.sidecar import sidecar_path
from tasks.config import MlflowParams, Params
from tasks.contracts import BenchmarkSummary, Evaluation, TrainSummary, Workspace
from tasks.errors import ServiceUnavailable, StageError

log = logging.getLogger(__name__)
VARIANT_METRICS = ("accuracy", "accuracy_drop_pts", "agreement", "max_abs_diff", "size_bytes", "gzip_bytes",
                   "weight_bytes", "size_reduction", "weight_reduction", "sparsity", "latency_p50_ms",
                   "latency_p95_ms", "model_rss_bytes", "peak_rss_bytes")
REPORT_SUFFIXES = ("csv", "md", "png")


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    experiment_id: str
    artifact_uri: str
    tracking_uri: str


def no_answer(error: BaseException) -> bool:
    """True when ``error`` (or what caused it) means the server did not answer or answered 5xx."""
    import requests
    from mlflow.exceptions import RestException

    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ConnectionError | TimeoutError | requests.ConnectionError | requests.Timeout):
            return True
        if isinstance(seen, RestException) and seen.get_http_status_code() >= 500:
            return True
        if "API request to" in str(seen) and "failed with exception" in str(seen):  # MLflow's retries gave up
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def configure(params: MlflowParams) -> str:
    """Point MLflow at the configured store; fail fast with a clear message when it cannot be used.

    A server that does not answer is :class:`ServiceUnavailable` (flows retry it); a store that answers
    with an error (a wrong URI scheme, an unreadable SQLite file) is a :class:`StageError` (no retry).
    """
    import mlflow

    uri = params.tracking_uri
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.MlflowClient().search_experiments(max_results=1)
    except Exception as error:  # requests, sqlalchemy and MLflow each raise their own types
        if no_answer(error):
            raise ServiceUnavailable(f"MLflow tracking store {uri} is unreachable ({type(error).__name__}: "
                                     f"{error}); start the server or set MLFLOW_TRACKING_URI to one that answers"
                                     ) from error
        raise StageError(f"MLflow tracking store {uri} cannot be used ({type(error).__name__}: {error}); check "
                         "MLFLOW_TRACKING_URI or mlflow.tracking_uri in params.yaml") from error
    return uri


def local_artifact_root(uri: str) -> Path | None:
    """Where a local store keeps artifacts: ``mlartifacts/`` beside its SQLite file; None for servers.

    Tied to the store, not to a run's workspace: the experiment is shared by every run, so its artifact
    root must outlive any one (scratch) workspace.
    """
    if uri.startswith("sqlite:///"):
        return Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
    return None


def ensure_experiment(params: MlflowParams) -> str:
    """The experiment's id, creating it (with a local artifact root for local stores) when missing."""
    import mlflow

    client = mlflow.MlflowClient()
    experiment = client.get_experiment_by_name(params.experiment)
    if experiment is not None:
        return experiment.experiment_id
    root = local_artifact_root(params.tracking_uri)
    location = root.as_uri() if root else None
    return client.create_experiment(params.experiment, artifact_location=location)


DEVICE_METRICS = {"p50_ms": "p50_ms", "p95_ms": "p95_ms", "accuracy": "accuracy", "peak_rss_bytes": "peak_rss_mb",
                  "energy_mj": "energy_mj", "throughput_ips": "throughput_ips"}


def device_metrics(summary: BenchmarkSummary) -> dict[str, float]:
    """``device.<device>.<variant>[.<config>].<figure>``: every on-device figure as an MLflow metric."""
    metrics: dict[str, float] = {}
    for row in summary.rows:
        if row.status != "ok":
            continue
        suffix = "" if row.config == "default" else f".{row.config}"
        for key, name in DEVICE_METRICS.items():
            value = getattr(row, key)
            if value is not None:
                metrics[f"device.{row.device}.{row.variant}{suffix}.{name}"] = (
                    value / 2**20 if key == "peak_rss_bytes" else float(value))
    return metrics


def variant_metrics(evaluation: Evaluation) -> dict[str, float]:
    return {f"{row.variant}.{key}": float(getattr(row, key)) for row in evaluation.rows if row.status == "ok"
            for key in VARIANT_METRICS if getattr(row, key) is not None}


@contextmanager
def pipeline_run(params: Params, workspace: Workspace, evaluation: Evaluation, summary: TrainSummary,
                 lineage: dict[str, Any], extra_tags: dict[str, str] | None = None,
                 benchmark: BenchmarkSummary | None = None) -> Iterator[RunRecord]:
    """Log one run (flattened params, lineage tags, per-variant metrics, reports, model files) and stay in it.

    Work done inside the ``with`` block (registration) belongs to the run: when it raises (a failed
    registration, or a candidate the gates rejected) the run ends FAILED, with everything a reviewer
    needs to see why.
    """
    import mlflow

    experiment_id = ensure_experiment(params.mlflow)
    with mlflow.start_run(experiment_id=experiment_id) as run:
        mlflow.log_params(params.flat())
        mlflow.set_tags({"data_version": lineage.get("data_version", "unknown"),
                         "git_commit": lineage.get("git_commit", "unknown"),
                         "params_hash": lineage.get("params_hash", params.params_hash()),
                         "zoo_model": params.train.model, "recommended_variant": str(evaluation.recommended),
                         "quantize.strategy": params.quantize.strategy, **(extra_tags or {})})
        mlflow.log_metrics({"baseline.val_accuracy": summary.baseline.val_accuracy,
                            "baseline.test_accuracy": summary.baseline.test_accuracy,
                            "ptq_check.drop_pts": summary.ptq_check.drop_pts, **variant_metrics(evaluation)})
        for path in [workspace.comparison_file(suffix) for suffix in REPORT_SUFFIXES] + [workspace.evaluation_file]:
            mlflow.log_artifact(str(path), "reports")
        mlflow.log_dict(summary.model_dump(mode="json"), "reports/train_summary.json")
        if benchmark is not None:  # on-device figures: device.<device>.<variant>.p95_ms, ... and the reports
            mlflow.log_metrics(device_metrics(benchmark))
            mlflow.set_tags({f"device.{device}.recommended": str(variant)
                             for device, variant in benchmark.recommended().items()})
            for path in sorted(workspace.benchmark_dir.iterdir()):
                mlflow.log_artifact(str(path), "reports/benchmark")
        for row in evaluation.rows:
            model_file = workspace.variant_file(row.variant)
            if row.status == "ok" and model_file.is_file():
                mlflow.log_artifact(str(model_file), f"models/{row.variant}")
                mlflow.log_artifact(str(sidecar_path(model_file)), f"models/{row.variant}")
        yield RunRecord(run.info.run_id, experiment_id, run.info.artifact_uri, mlflow.get_tracking_uri())


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """The MLflow UI address of a run, when the store is a server (None for a local store)."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
