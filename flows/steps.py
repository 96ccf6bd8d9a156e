"""Prefect task wrappers around the task functions: retries, timeouts, result persistence. No logic.

Results are persisted and cached per flow run and task name, so a run that is suspended for the
approval gate and later resumed picks up where it stopped instead of training again. Only
transient failures are retried (:mod:`flows.retry`): a bug, bad data or a refusal fails at once.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from flows.parameters import DEVICES_PATH
from flows.retry import retry_transient
from tasks.benchmark import stage as benchmark_stage
from tasks.config import Params
from tasks.contracts import (
    BenchmarkSummary,
    ConversionResult,
    Evaluation,
    Registration,
    TrainSummary,
    Workspace,
    read_prepared,
)
from tasks.data import prepare as prepare_stage
from tasks.data import versioning
from tasks.devices import load_devices
from tasks.evaluation import evaluate as evaluate_stage
from tasks.model import convert as convert_stage
from tasks.model import train as train_stage
from tasks.monitoring import check as drift_check
from tasks.packaging import package
from tasks.registry import challenge, device_choice, promotion, tracking
from tasks.registry import register as register_stage
from tasks.registry.device_choice import DeviceChoice


def per_run_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Same flow run + same task: reuse the persisted result (resume after suspend)."""
    return f"{context.task_run.flow_run_id}-{context.task.name}"


PERSISTED = {"persist_result": True, "cache_key_fn": per_run_cache_key}
TRANSIENT_RETRIES = {"retries": 3, "retry_delay_seconds": exponential_backoff(5), "retry_condition_fn": retry_transient}


@task(name="check-services", **{**TRANSIENT_RETRIES, "retry_delay_seconds": exponential_backoff(2)}, **PERSISTED)
def check_services(params: Params) -> str:
    """Fail before any work when the MLflow store does not answer."""
    return tracking.configure(params.mlflow)


@task(name="data-version", timeout_seconds=1800, **TRANSIENT_RETRIES, **PERSISTED)
def data_version(params: Params) -> dict[str, Any]:
    """The raw data version (added and pushed, or pulled on a worker host) and its lineage tags for the run."""
    version = versioning.check_data_version(params.data)
    return {**asdict(version), "tags": version.lineage_tags()}


@task(name="prepare", timeout_seconds=1800, **PERSISTED)
def prepare(params: Params, workspace: Workspace) -> str:
    _, version = prepare_stage.prepare(params.data, params.seed, workspace, params.retrain.labelled_dir,
                                       params.retrain.labelled_holdout_fraction)
    return version


@task(name="train", timeout_seconds=6 * 3600, **PERSISTED)
def train_models(params: Params, workspace: Workspace) -> TrainSummary:
    return train_stage.train(params, read_prepared(workspace), workspace)


@task(name="convert", timeout_seconds=3600, **PERSISTED)
def convert_variants(params: Params, workspace: Workspace, summary: TrainSummary) -> list[ConversionResult]:
    return convert_stage.convert_all(params, read_prepared(workspace), summary, workspace)


@task(name="evaluate", timeout_seconds=3600, **PERSISTED)
def evaluate_variants(params: Params, workspace: Workspace, conversions: list[ConversionResult]) -> Evaluation:
    return evaluate_stage.evaluate(params.evaluate, workspace, conversions, DEVICES_PATH)


@task(name="benchmark-on-devices", timeout_seconds=4 * 3600, **PERSISTED)
def benchmark_on_devices(params: Params, workspace: Workspace, evaluation: Evaluation) -> BenchmarkSummary:
    """Every candidate on every device through its runner; unreachable devices give error rows, not a failure."""
    return benchmark_stage.benchmark(params, workspace, DEVICES_PATH, evaluation=evaluation)


@task(name="choose-per-device", **PERSISTED)
def choose_per_device(evaluation: Evaluation, benchmark: BenchmarkSummary | None,
                      device_names: list[str]) -> list[DeviceChoice]:
    """The release's variant per device class and the rule that chose it (those named, or all)."""
    choices = device_choice.choose_per_device(evaluation, load_devices(DEVICES_PATH), benchmark)
    return [choice for choice in choices if not device_names or choice.device in device_names]


@task(name="register", timeout_seconds=900, **TRANSIENT_RETRIES, **PERSISTED)
def register_candidate(params: Params, workspace: Workspace, evaluation: Evaluation, summary: TrainSummary,
                       tags: dict[str, str], benchmark: BenchmarkSummary | None = None) -> Registration:
    """Record the run in MLflow; register the recommended variant (a rejected run ends FAILED there)."""
    return register_stage.register(params, workspace, evaluation, summary, tags, benchmark)


@task(name="compare-with-champion", timeout_seconds=1800, **TRANSIENT_RETRIES, **PERSISTED)
def compare_with_champion(params: Params, workspace: Workspace, registration: Registration) -> dict[str, Any]:
    return challenge.compare_with_champion(params, workspace, registration, DEVICES_PATH)


@task(name="promote", **TRANSIENT_RETRIES)
def promote(params: Params, version: str, approval: promotion.ApprovalRecord) -> dict[str, Any]:
    tracking.configure(params.mlflow)
    return promotion.promote(params.mlflow.registered_model, str(version), approval)


@task(name="package-images", timeout_seconds=3600, **TRANSIENT_RETRIES)
def package_images(params: Params, workspace: Workspace, version: str) -> dict[str, Any]:
    """Build, check and push the edge images of ``version``; the report (digests, figures) as a dict."""
    return package.package(params, workspace, version=str(version), devices_path=DEVICES_PATH).model_dump(mode="json")


@task(name="analyse-collected-data", timeout_seconds=1800, cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def analyse_collected(params: Params, report_dir: Path) -> drift_check.CheckOutcome:
    """The pending uploads as a window (malformed ones quarantined), analysed against the champion's reference."""
    return drift_check.run_check(params.drift, params.mlflow, report_dir, seed=params.seed)


@task(name="record-drift-check", cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def record_drift_check(params: Params, outcome: drift_check.CheckOutcome) -> None:
    """The check as an MLflow run (HTML report, JSON summary), and its figures for Prometheus."""
    drift_check.log_check(params.drift, params.mlflow, outcome)
    drift_check.write_prometheus(outcome, params.drift.metrics_file)
