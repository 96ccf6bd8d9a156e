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
from flows.parameters import PARAMS_PATH, apply_override, overrides_of
from tasks.config import DriftParams, load_params
from tasks.monitoring.figures import event_payload
from tasks.monitoring.policy import Verdict, decide

DRIFT_EVENT = "edgeloop.drift.detected"
EVENT_RESOURCE = "edgeloop.collected-data"
# What a person may change for one check: every field of ``drift`` in params.yaml, optional (unset: its value
# there); generated from DriftParams, so fields, bounds and descriptions are its own.
DriftSettings = overrides_of(DriftParams, "DriftSettings", module=__name__)


@flow(name="drift-check", log_prints=True, persist_result=True)
def drift_check(collected_dir: str | None = None, settings: DriftSettings | None = None,
                report_dir: str = "reports/drift") -> dict[str, Any]:
    """Analyse the uploads since the last check; emit edgeloop.drift.detected when the trigger policy fires.

    Args:
        collected_dir: where devices upload samples (default: drift.collected_dir in params.yaml).
        settings: drift parameters to change for this check, e.g. {"cooldown_h": 6} (unset: params.yaml's).
        report_dir: folder for each window's Evidently HTML report and JSON summary.
    """
    logger = get_run_logger()
    params = load_params(PARAMS_PATH)
    drift = apply_override(params.drift, settings, "the drift check's settings")
    drift = apply_override(drift, {"collected_dir": collected_dir}, "the drift check's collected_dir")
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
        payload = event_payload(summary) | {"collected_dir": str(drift.collected_dir)}
        emit_event(event=DRIFT_EVENT, resource={"prefect.resource.id": EVENT_RESOURCE}, payload=payload)
        logger.info("emitted %s", DRIFT_EVENT)
    save_state(drift.state_variable, state.recorded(verdict, outcome.decision.fire))
    return summary
