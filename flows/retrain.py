"""The ``retrain`` flow (drift trigger or UI): new candidate, challenger vs champion, human approval, promotion,
then the staged rollout to the fleet (``flows/rollout.py``)."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger, pause_flow_run, resume_flow_run, suspend_flow_run
from prefect.artifacts import create_markdown_artifact
from prefect.context import FlowRunContext
from prefect.exceptions import FlowPauseTimeout, NotPausedError
from prefect.input import RunInput
from prefect.states import Completed, Failed, State
from pydantic import Field

from flows import steps
from flows.artifacts import publish_images
from flows.locking import exclusive_outputs
from flows.parameters import DEFAULT_PARAMETERS, TrainingParameters, apply_override, resolve
from flows.rollout import RolloutPlan, rollout
from flows.training import build_candidate
from tasks.evaluation.compare import comparison_markdown
from tasks.registry.promotion import ApprovalRecord
from tasks.registry.tracking import run_url

log = logging.getLogger(__name__)
TIMEOUT_REVIEWER = "edgeloop-timeout"
PAUSE_BACKSTOP_S = 60


class ApprovalDecision(RunInput):
    """The reviewer's decision; the Prefect UI renders it as the resume form."""

    approve: bool
    reviewer: str = Field(min_length=1, description="who decided (recorded on the model version)")
    comment: str = ""


def _expire_pause(flow_run_id: UUID, timeout_s: int) -> None:
    """Resume a local run that nobody decided on, marked as a timeout (not an approval)."""
    try:
        resume_flow_run(flow_run_id, run_input={"approve": False, "reviewer": TIMEOUT_REVIEWER,
                                                "comment": f"no decision within {timeout_s} s"})
    except NotPausedError:  # a human resumed it first: their decision stands
        log.info("approval timer found run %s already resumed", flow_run_id)  # timer thread: no run context
    except Exception as error:  # the server is down or refused: say so, the Prefect pause timeout still ends it
        log.warning("approval timer could not expire run %s (%s: %s); the pause backstop will end it",
                    flow_run_id, type(error).__name__, error)


def wait_for_decision(timeout_s: int) -> ApprovalDecision | None:
    """Suspend (deployment runs: no worker held) or pause (local runs) until a decision or the timeout.

    Suspended runs that time out are failed by the Prefect server ("paused and never resumed"). A
    local run's own timer resumes it at the deadline so the run can end with a message of ours; the
    Prefect pause timeout is only a backstop a little later.
    """
    context = FlowRunContext.get()
    if context.flow_run.deployment_id is not None:
        return suspend_flow_run(wait_for_input=ApprovalDecision, timeout=timeout_s, key="approval")
    timer = threading.Timer(timeout_s, _expire_pause, args=(context.flow_run.id, timeout_s))
    timer.daemon = True
    timer.start()
    try:
        decision = pause_flow_run(wait_for_input=ApprovalDecision, timeout=timeout_s + PAUSE_BACKSTOP_S,
                                  poll_interval=2, key="approval")
    except FlowPauseTimeout:
        return None
    finally:
        timer.cancel()
    return None if decision.reviewer == TIMEOUT_REVIEWER else decision


def roll_out_promoted(fleet_file: Path, version: str, plan: RolloutPlan | None, enabled: bool,
                      promoted: dict[str, Any]) -> dict[str, Any] | State:
    """The promoted version to the fleet through the ``rollout`` flow (a subflow), or why not."""
    logger = get_run_logger()
    if not enabled:
        logger.info("fleet rollout off for this run: start the rollout/manual deployment for version %s", version)
        return {**promoted, "rollout": "skipped: fleet_rollout is off"}
    if not fleet_file.is_file():
        logger.info("no fleet file %s (edgeloop fleet add-device creates it): version %s is champion, nothing to "
                    "roll out to", fleet_file, version)
        return {**promoted, "rollout": f"skipped: no fleet file {fleet_file}"}
    state = rollout(version=version, plan=plan, return_state=True)
    if not state.is_completed():
        return Failed(message=f"version {version} is champion, but its rollout did not run to an end "
                      f"({state.message}); fix that and start the rollout/manual deployment for it")
    report = state.result()
    if report["outcome"] == "rolled_back":
        return Completed(name="Rolled back", message=f"version {version} was approved and promoted, then rolled "
                         f"back on the fleet: {report['reason']}")
    if report["outcome"] != "completed":  # unhealthy with no previous version to return to
        return Failed(message=f"version {version} is champion but unhealthy on the fleet: {report['reason']}")
    return {**promoted, "rollout": {key: report[key] for key in ("rollout_id", "outcome", "target", "previous")}}


@flow(name="retrain", log_prints=True, persist_result=True)
def retrain(params: TrainingParameters = DEFAULT_PARAMETERS, drift_summary: dict[str, Any] | None = None,
            approval_timeout_s: int | None = None, workspace: str | None = None, fleet_rollout: bool = True,
            rollout_plan: RolloutPlan | None = None) -> dict[str, Any] | State:
    """Retrain on the newest data, promote the challenger only with a human approval, then roll it out.

    Args:
        params: what to change for this run (defaults: params.yaml).
        drift_summary: what triggered the run (filled in by the edgeloop.drift.detected trigger).
        approval_timeout_s: how long to wait for a decision (default: retrain.approval_timeout_s).
        workspace: folder for this run's outputs (default: the repository's workspace/ folder).
        fleet_rollout: roll the promoted version out to the fleet (canary first) when a fleet file exists.
        rollout_plan: cohort plan and health limits of that rollout (defaults: rollout in params.yaml).
    """
    logger = get_run_logger()
    config, run_workspace = resolve(params, workspace)
    trigger = f"drift: {'; '.join(drift_summary.get('reasons', []))}" if drift_summary else "retrain (manual)"
    logger.info("retrain started by %s", trigger)
    with exclusive_outputs(run_workspace):
        # ---- challenger: the same path as the nightly training --------------------------
        _, registration, _ = build_candidate(config, run_workspace, params, trigger)
        # ---- challenger vs champion on the same evaluation sets -------------------------
        comparison = steps.compare_with_champion(config, run_workspace, registration)
    url = run_url(registration.tracking_uri, registration.experiment_id, registration.run_id)
    links = {"MLflow run": url} if url else {}
    create_markdown_artifact(key="challenger-vs-champion", markdown=comparison_markdown(comparison, links),
                             description="Decide by resuming this run")
    # ---- human approval gate ------------------------------------------------------------
    timeout_s = approval_timeout_s or config.retrain.approval_timeout_s
    decision = wait_for_decision(timeout_s)
    version = registration.version
    if decision is None:
        return Failed(message=f"no decision within {timeout_s} s: version {version} not promoted, champion unchanged")
    approval = ApprovalRecord.from_decision(decision.approve, decision.reviewer, decision.comment)
    if not approval.approve:
        return Completed(name="Rejected", message=f"rejected by {approval.reviewer or 'unknown'}: "
                         f"{approval.comment or 'no comment'}; version {version} not promoted, champion unchanged")
    # ---- the approved version's images: built, checked and pushed before it becomes champion ----
    publish_images(steps.package_images(config, run_workspace, version))
    # ---- promotion (refuses without the approval record) --------------------------------
    promoted = steps.promote(config, version, approval)
    # ---- the fleet: canary, wider stages, rolled back (champion too) when it hurts --------
    fleet_file = apply_override(config.rollout, rollout_plan, "the rollout plan").fleet_file
    return roll_out_promoted(fleet_file, version, rollout_plan, fleet_rollout, promoted)
