"""The drift trigger's memory in the Prefect server: a variable of recent verdicts, and the retrain runs.

Kept in the server, not in a local file, so that a check on any worker sees what the checks before it
decided (the ``hourly`` deployment runs one check at a time: ``concurrency_limit: 1``).
"""

from __future__ import annotations

import logging
from datetime import datetime

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowFilter, FlowFilterName
from prefect.client.schemas.sorting import FlowRunSort
from prefect.variables import Variable
from pydantic import ValidationError

from tasks.monitoring.policy import DriftState

log = logging.getLogger(__name__)
RETRAIN_FLOW = "retrain"


def load_state(name: str) -> DriftState:
    """The state in variable ``name``; empty when there is none. A damaged value is logged and started afresh."""
    value = Variable.get(name, default=None)
    if value is None:
        return DriftState()
    try:
        return DriftState.model_validate(value)
    except ValidationError as error:
        log.error("Prefect variable %s does not hold a drift state (%s); starting from an empty history (every "
                  "earlier verdict is still in MLflow)", name, error)
        return DriftState()


def save_state(name: str, state: DriftState) -> None:
    Variable.set(name, state.model_dump(mode="json", by_alias=True), overwrite=True)


def last_retrain_started() -> float | None:
    """Unix time the newest ``retrain`` flow run started (or is due to start, for one just created); None if none."""
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[RETRAIN_FLOW])),
                                     sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=5)
    times: list[datetime] = [moment for run in runs
                             for moment in (run.start_time or run.expected_start_time or run.created,) if moment]
    return max(times).timestamp() if times else None
