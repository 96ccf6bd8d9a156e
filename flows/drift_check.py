"""The ``drift-check`` flow (hourly): summarise what devices collected; emit the retrain trigger event."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows import steps
from flows.artifacts import publish_drift_summary
from flows.parameters import PARAMS_PATH
from tasks.config import load_params

DRIFT_EVENT = "edgeloop.drift.detected"


@flow(name="drift-check", log_prints=True)
def drift_check(collected_dir: str | None = None) -> dict[str, Any]:
    """Load and summarise the collected samples; when the retraining rule fires, emit edgeloop.drift.detected.

    Args:
        collected_dir: where devices upload samples (default: drift.collected_dir in params.yaml).
    """
    drift_params = load_params(PARAMS_PATH).drift
    if collected_dir:
        drift_params = drift_params.model_copy(update={"collected_dir": collected_dir})
    summary = steps.summarise_collected(drift_params)
    publish_drift_summary(summary)
    if summary["drift_detected"]:
        emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": "edgeloop.collected-data"}, payload=summary)
        get_run_logger().info("emitted %s: %s", DRIFT_EVENT, summary["reasons"])
    return summary
