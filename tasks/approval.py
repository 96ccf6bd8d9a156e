"""The approval gate from a terminal: list retrain runs waiting for a decision, approve or reject one.

The same decision as the Resume form in the Prefect UI: ``resume_flow_run`` with the
:class:`flows.retrain.ApprovalDecision` input (approve, reviewer, comment).
"""

from __future__ import annotations

from uuid import UUID

import httpx
from prefect import resume_flow_run
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterName,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.exceptions import FlowPauseTimeout, NotPausedError

from tasks.errors import ServiceUnavailable, StageError

RETRAIN_FLOW = "retrain"


def _read(flow_run_filter: FlowRunFilter, flow_filter: FlowFilter | None = None) -> list[FlowRun]:
    try:
        with get_client(sync_client=True) as client:
            return client.read_flow_runs(flow_run_filter=flow_run_filter, flow_filter=flow_filter)
    except (httpx.HTTPError, OSError) as error:  # no answer, or an error status from the Prefect API
        from prefect.settings import PREFECT_API_URL

        raise ServiceUnavailable(f"Prefect API {PREFECT_API_URL.value() or '(PREFECT_API_URL unset)'} did not "
                                 f"answer ({type(error).__name__}: {error}); start it (make services) or set "
                                 "PREFECT_API_URL") from error


def waiting_runs() -> list[FlowRun]:
    """Retrain runs paused or suspended at the approval gate, oldest first."""
    paused = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    runs = _read(paused, FlowFilter(name=FlowFilterName(any_=[RETRAIN_FLOW])))
    return sorted(runs, key=lambda run: run.created or 0)


def find_run(reference: str) -> FlowRun:
    """The flow run named ``reference`` (``crimson-otter``) or with that id; it must be waiting."""
    try:
        by = FlowRunFilter(id=FlowRunFilterId(any_=[UUID(reference)]))
    except ValueError:
        by = FlowRunFilter(name=FlowRunFilterName(any_=[reference]))
    runs = _read(by)
    if not runs:
        waiting = ", ".join(run.name for run in waiting_runs()) or "none"
        raise StageError(f"no flow run {reference!r}; runs waiting for a decision: {waiting}")
    if len(runs) > 1:
        raise StageError(f"{len(runs)} flow runs are named {reference!r}; use the id: "
                         + ", ".join(str(run.id) for run in runs))
    return runs[0]


def decide(reference: str, approve: bool, reviewer: str, comment: str = "") -> FlowRun:
    """Approve or reject the waiting run ``reference``; the reviewer's name is recorded with the decision."""
    if not reviewer.strip():
        raise StageError("a decision needs a reviewer: pass --reviewer NAME (it is recorded on the model version)")
    run = find_run(reference)
    if run.state is None or not run.state.is_paused():
        state = run.state.name if run.state else "unknown"
        raise StageError(f"flow run {run.name} ({run.id}) is {state}, not waiting for a decision")
    try:
        resume_flow_run(run.id, run_input={"approve": approve, "reviewer": reviewer.strip(), "comment": comment})
    except NotPausedError as error:
        raise StageError(f"flow run {run.name} was resumed by someone else meanwhile ({error})") from error
    except (FlowPauseTimeout, RuntimeError) as error:  # Prefect: "can no longer be resumed", or the server's reason
        raise StageError(f"flow run {run.name} cannot be resumed: {error}") from error
    return run
