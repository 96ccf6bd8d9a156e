"""The ``drift-check`` flow (hourly): uploads -> window -> Evidently analysis -> trigger policy -> retrain event."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger
from prefect.events import emit_event

from flows import steps
from flows.artifacts import publish_drift_check
from flows.drift_state import last_retrain_started, load_state, save_state
from flows.parameters import PARAMS_PATH
from tasks.config import DriftParams, load_params
from tasks.monitoring.policy import Verdict, decide

DRIFT_EVENT = "edgeloop.drift.detected"
EVENT_RESOURCE = "edgeloop.collected-data"
PAYLOAD_KEYS = ("window_id", "status", "reasons", "rows", "drift_share", "drifted_features", "mean_confidence",
                "latency_p95_ms", "reference", "decision", "window_file", "mlflow_run")


@flow(name="drift-check", log_prints=True, persist_result=True)
def drift_check(collected_dir: str | None = None, settings: dict[str, Any] | None = None,
                report_dir: str = "reports/drift") -> dict[str, Any]:
    """Analyse the uploads since the last check; emit edgeloop.drift.detected when the trigger policy fires.

    Args:
        collected_dir: where devices upload samples (default: drift.collected_dir in params.yaml).
        settings: other drift parameters to change for this check, e.g. {"cooldown_h": 6}.
        report_dir: folder for each window's Evidently HTML report and JSON summary.
    """
    logger = get_run_logger()
    params = load_params(PARAMS_PATH)
    update = {**(settings or {}), **({"collected_dir": collected_dir} if collected_dir else {})}
    drift = DriftParams.model_validate({**params.drift.model_dump(), **update})
    params = params.model_copy(update={"drift": drift})
    outcome = steps.analyse_collected(params, Path(report_dir))
    analysis = outcome.analysis
    state = load_state(drift.state_variable)
    verdict = Verdict(window_id=analysis.window_id, at=time.time(), status=analysis.status, reasons=analysis.reasons)
    outcome.decision = decide(state, verdict, drift, last_retrain_started())
    steps.record_drift_check(params, outcome)
    summary = outcome.summary()
    publish_drift_check(summary)
    logger.info("window %s: %s (%s); %s", analysis.window_id, analysis.status, "; ".join(analysis.reasons) or
                "within thresholds", outcome.decision.reason)
    if outcome.decision.fire:
        payload = {key: summary[key] for key in PAYLOAD_KEYS} | {"collected_dir": str(drift.collected_dir)}
        emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": EVENT_RESOURCE}, payload=payload)
        logger.info("emitted %s", DRIFT_EVENT)
    save_state(drift.state_variable, state.recorded(verdict, outcome.decision.fire))
    return summary
