"""Prefect task wrappers around the task functions: retries, timeouts, result persistence.

Results are persisted and cached per flow run and task name, so a run that is suspended for the
approval gate and later resumed picks up where it stopped instead of training again.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from flows.parameters import DEVICES_FILE
from tasks import compare, convert, data, dataversion, drift, evaluate, promotion, registry, tracking, train
from tasks.config import DriftParams, Params
from tasks.devices import load_devices


def per_run_cache_key(context: TaskRunContext, parameters: dict[str, Any]) -> str:
    """Same flow run + same task: reuse the persisted result (resume after suspend)."""
    return f"{context.task_run.flow_run_id}-{context.task.name}"


PERSISTED = {"persist_result": True, "cache_key_fn": per_run_cache_key}


@task(name="check-services", retries=3, retry_delay_seconds=exponential_backoff(2), **PERSISTED)
def check_services(params: Params) -> str:
    """Fail before any work when the MLflow store does not answer."""
    return tracking.configure(params.mlflow)


@task(name="data-version", retries=2, retry_delay_seconds=exponential_backoff(5), timeout_seconds=1800,
      **PERSISTED)
def data_version(params: Params) -> dict[str, Any]:
    return asdict(dataversion.check_data_version(params.data))


@task(name="prepare", timeout_seconds=1800, **PERSISTED)
def prepare(params: Params) -> str:
    _, version = data.prepare(params.data, params.seed)
    return version


@task(name="train", timeout_seconds=6 * 3600, **PERSISTED)
def train_models(params: Params) -> dict[str, Any]:
    return train.train(params, data.load_prepared(Path(params.data.output_dir)))


@task(name="convert", timeout_seconds=3600, **PERSISTED)
def convert_variants(params: Params) -> list[dict[str, Any]]:
    return [asdict(r) for r in convert.convert_all(params, data.load_prepared(Path(params.data.output_dir)))]


@task(name="evaluate", timeout_seconds=3600, **PERSISTED)
def evaluate_variants(params: Params) -> dict[str, Any]:
    return evaluate.evaluate(params, DEVICES_FILE)


@task(name="register", retries=3, retry_delay_seconds=exponential_backoff(5), timeout_seconds=900, **PERSISTED)
def register_candidate(params: Params, tags: dict[str, str]) -> dict[str, Any]:
    return registry.register(params, tags)  # configures MLflow itself


@task(name="compare-with-champion", timeout_seconds=1800, **PERSISTED)
def compare_with_champion(params: Params, registration: dict[str, Any], workdir: str) -> dict[str, Any]:
    """Score the new version and the current champion on the frozen test set (+ labelled data)."""
    tracking.configure(params.mlflow)
    prepared = data.load_prepared(Path(params.data.output_dir))
    datasets = {"frozen test set": prepared.test}
    labelled = compare.load_labelled(Path(params.retrain.labelled_dir), prepared.test.labels)
    if labelled is not None:
        datasets["newly labelled"] = labelled
    inventory = load_devices(DEVICES_FILE)
    name = registration["registered_model"]
    challenger_version = tracking_version(name, registration["version"])
    challenger_file = promotion.download_version(challenger_version, Path(workdir) / "challenger")
    challenger = compare.score_model("challenger", str(registration["version"]), challenger_file, datasets,
                                     inventory)
    champion = None
    champion_version = promotion.version_by_alias(name, promotion.CHAMPION_ALIAS)
    if champion_version is not None:
        champion_file = promotion.download_version(champion_version, Path(workdir) / "champion")
        champion = compare.score_model("champion", str(champion_version.version), champion_file, datasets, inventory)
    return compare.compare(challenger, champion)


def tracking_version(name: str, version: str | int) -> Any:
    import mlflow

    return mlflow.MlflowClient().get_model_version(name, str(version))


def retry_unless_refused(task, task_run, state) -> bool:
    """Retry promotion on transient errors (MLflow down), never on a refusal: retrying cannot approve it."""
    try:
        state.result()
    except promotion.PromotionRefused:
        return False
    except Exception:
        return True
    return False


@task(name="promote", retries=2, retry_delay_seconds=exponential_backoff(5), retry_condition_fn=retry_unless_refused)
def promote(params: Params, version: str, approval: promotion.ApprovalRecord) -> dict[str, Any]:
    tracking.configure(params.mlflow)
    return promotion.promote(params.mlflow.registered_model, str(version), approval)


@task(name="summarise-collected-data", timeout_seconds=1800)
def summarise_collected(params: DriftParams) -> dict[str, Any]:
    return drift.summarise(params).as_dict()
