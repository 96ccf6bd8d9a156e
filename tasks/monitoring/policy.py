"""When drift starts a retrain: the trigger policy, as a pure function of the recent verdicts.

Fire only when

- this window's thresholds are exceeded (``drift``): a window under ``drift.min_samples`` or an invalid
  one never fires;
- the last ``drift.consecutive_windows`` windows with a verdict all exceeded them. Windows without a
  verdict (too small, invalid) neither count nor break the run; windows up to the last trigger are
  used up by it;
- ``drift.cooldown_h`` hours have passed since the last retrain started (a retrain run found in the
  Prefect server, or this policy's own last trigger, whichever is later).

The state (:class:`DriftState`) lives in a Prefect variable so that a check on any worker sees the
verdicts of the checks before it (``flows/drift_state.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from tasks.config import DriftParams
from tasks.monitoring.analysis import Status

KEEP_VERDICTS = 16       # verdicts kept in the state (drift.consecutive_windows is at most 12)
MAX_REASON_CHARS = 80    # a Prefect variable holds 5,000 characters: one trimmed reason per verdict (all in MLflow)
MAX_STATE_CHARS = 4500
STATE_SCHEMA = "edgeloop.drift-state/1"


class Verdict(BaseModel):
    model_config = ConfigDict(extra="ignore")
    window_id: str
    at: float  # unix seconds of the check
    status: Status
    reasons: list[str] = []


class DriftState(BaseModel):
    model_config = ConfigDict(extra="ignore")
    schema_id: str = Field(STATE_SCHEMA, alias="schema")
    verdicts: list[Verdict] = []
    last_trigger_at: float | None = None
    last_trigger_window: str | None = None

    def recorded(self, verdict: Verdict, fired: bool) -> DriftState:
        """The state after ``verdict``, trimmed to :data:`KEEP_VERDICTS` and reason lengths."""
        short = verdict.model_copy(update={"reasons": [r[:MAX_REASON_CHARS] for r in verdict.reasons[:1]]})
        update: dict = {"verdicts": [*self.verdicts, short][-KEEP_VERDICTS:]}
        if fired:
            update |= {"last_trigger_at": verdict.at, "last_trigger_window": verdict.window_id}
        state = self.model_copy(update=update)
        while len(state.model_dump_json(by_alias=True)) > MAX_STATE_CHARS and len(state.verdicts) > 1:
            state = state.model_copy(update={"verdicts": state.verdicts[1:]})
        return state


@dataclass(frozen=True)
class Decision:
    fire: bool
    streak: int             # consecutive exceeded windows with a verdict, this one included, since the last trigger
    reason: str             # why it fires or not, for the log and the report
    cooldown_until: float | None = None


def _streak(verdicts: list[Verdict], last_trigger_window: str | None) -> int:
    streak = 0
    for verdict in reversed(verdicts):
        if verdict.window_id == last_trigger_window:
            break
        if verdict.status in ("too_small", "invalid"):
            continue
        if verdict.status != "drift":
            break
        streak += 1
    return streak


def decide(state: DriftState, verdict: Verdict, params: DriftParams,
           last_retrain_started: float | None) -> Decision:
    """Whether ``verdict`` (the newest window) starts a retrain, given the earlier verdicts in ``state``."""
    if verdict.status != "drift":
        meaning = {"ok": "thresholds not exceeded", "too_small": "window too small for a verdict",
                   "invalid": "invalid window (reported, not drift)"}[verdict.status]
        return Decision(False, 0, meaning)
    streak = _streak([*state.verdicts, verdict], state.last_trigger_window)
    if streak < params.consecutive_windows:
        return Decision(False, streak, f"exceeded in {streak} of the {params.consecutive_windows} consecutive "
                                       "windows needed")
    started = max((t for t in (last_retrain_started, state.last_trigger_at) if t is not None), default=None)
    if started is not None and verdict.at - started < params.cooldown_h * 3600:
        until = started + params.cooldown_h * 3600
        hours = (verdict.at - started) / 3600
        return Decision(False, streak, f"in cooldown: the last retrain started {hours:.1f} h ago "
                                       f"(< drift.cooldown_h {params.cooldown_h:g})", until)
    return Decision(True, streak, f"exceeded in {streak} consecutive windows (>= {params.consecutive_windows})"
                                  + ("" if started is None else ", cooldown over"))
