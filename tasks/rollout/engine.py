"""The rollout state machine: publish a stage, wait for acknowledgements, watch health, widen or roll back.

Transport-free: it talks to the fleet through a :class:`Channel` (MQTT in :mod:`tasks.rollout.channel`,
an in-memory fleet in the unit tests). For each stage of ``rollout.stages`` (canary 5%, 25%, 100%):

1. pool the cohort's telemetry on the previous version from the last ``baseline_window_s`` (the baseline);
2. publish a signed manifest (next sequence, retained) whose cutoff puts exactly the stage's devices in
   the cohort; devices of earlier stages stay in it;
3. wait up to ``ack_timeout_s`` for every cohort device's status for that sequence: a ``failed`` or
   ``refused`` install rolls back at once; devices still silent at the deadline are named, and more of
   them than ``max_missing_fraction`` rolls back;
4. watch the cohort's telemetry on the new version for ``stage_window_s``: any health problem
   (:func:`tasks.rollout.health.problems`) rolls back at once, and so does a stage whose devices served
   traffic before but report none on the new version by ``ack_timeout_s`` after the window.

A rollback publishes a manifest signed as ``action: rollback`` to the previous version for the whole group
(devices that never updated acknowledge it as already active) and waits for the updated devices to come
back. The returned :class:`RolloutReport` holds every step with its time, for the flow's records.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.rollout import RolloutManifest, cohort_cutoff, cohort_position, sign_rollout
from tasks.config import DriftParams, RolloutParams
from tasks.rollout.health import Figures, pool, problems

FAILED_STATES = ("failed", "refused")


class Channel(Protocol):
    def current_sequence(self) -> int: ...
    def publish_manifest(self, payload: bytes) -> None: ...
    def statuses(self) -> dict[str, dict[str, Any]]: ...
    def telemetry_since(self, since: float) -> list[dict[str, Any]]: ...


@dataclass(frozen=True)
class Release:
    """A version devices can fetch: the signed bundle's URL and digest (and the image, for container devices)."""

    version: str
    bundle_url: str
    bundle_sha256: str
    image: str | None = None


@dataclass
class StageRecord:
    name: str
    percent: float
    action: Literal["install", "rollback"]
    version: str
    sequence: int = 0
    devices: list[str] = field(default_factory=list)
    started_at: float = 0.0
    acked_at: float | None = None
    ended_at: float | None = None
    installed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)   # device -> reason
    missing: list[str] = field(default_factory=list)       # no acknowledgement by the deadline
    baseline: Figures | None = None
    figures: Figures | None = None
    problems: list[str] = field(default_factory=list)


@dataclass
class RolloutReport:
    rollout_id: str
    group: str
    model_name: str
    target: str
    previous: str | None
    outcome: Literal["in_progress", "completed", "rolled_back", "failed"] = "in_progress"
    reason: str = ""
    stages: list[StageRecord] = field(default_factory=list)
    rollback: StageRecord | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _summaries_of(summaries: list[dict[str, Any]], devices: set[str], version: str) -> list[dict[str, Any]]:
    """The summaries ``devices`` sent about ``version``: all of them, so figures pool every request they counted."""
    return [summary for summary in summaries if summary.get("device") in devices and summary.get("version") == version]


class Rollout:
    """One rollout of ``target`` to ``devices`` (one group); :meth:`run` drives it to its end."""

    def __init__(self, channel: Channel, devices: list[str], key: Ed25519PrivateKey, params: RolloutParams,
                 drift: DriftParams, model_name: str, target: Release, previous: Release | None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = 0.5, on_step: Callable[[StageRecord], None] | None = None) -> None:
        if not devices:
            raise ValueError(f"group {params.group} has no devices to roll out to")
        self.channel, self.devices, self.key, self.params, self.drift = channel, sorted(devices), key, params, drift
        self.target, self.previous, self.clock, self.sleep, self.poll_s = target, previous, clock, sleep, poll_s
        self.on_step = on_step or (lambda record: None)
        self.report = RolloutReport(f"{model_name}-{target.version}-{uuid.uuid4().hex[:8]}", params.group,
                                    model_name, target.version, previous.version if previous else None)

    # ---- the stages -------------------------------------------------------------------------------

    def run(self) -> RolloutReport:
        updated: list[str] = []
        for index, percent in enumerate(self.params.stages):
            name = "canary" if index == 0 else f"{percent:g}%"
            cutoff = cohort_cutoff(self.report.rollout_id, self.devices, percent)
            cohort = [d for d in self.devices if cohort_position(self.report.rollout_id, d) <= cutoff]
            record = StageRecord(name, percent, "install", self.target.version, devices=cohort)
            self.report.stages.append(record)
            record.baseline = self._baseline(cohort)
            record.sequence = self._publish("install", self.target, cutoff, name)
            record.started_at = self.clock()
            self.on_step(record)
            reason = self._await_acks(record, self.target.version)
            updated = sorted(set(updated) | set(record.installed))
            if not reason:
                reason = self._watch(record)
            record.ended_at = self.clock()
            self.on_step(record)
            if reason:
                return self._roll_back(reason, updated)
        self.report.outcome = "completed"
        return self.report

    def _baseline(self, cohort: list[str]) -> Figures | None:
        if self.previous is None:
            return None
        since = self.clock() - self.params.baseline_window_s
        summaries = _summaries_of(self.channel.telemetry_since(since), set(cohort), self.previous.version)
        return pool(summaries) if summaries else None

    def _publish(self, action: Literal["install", "rollback"], release: Release, cutoff: float, stage: str,
                 reason: str = "") -> int:
        sequence = self.channel.current_sequence() + 1
        manifest = RolloutManifest(
            rollout_id=self.report.rollout_id, group=self.params.group, sequence=sequence, action=action,
            model_name=self.report.model_name, version=release.version, bundle_url=release.bundle_url,
            bundle_sha256=release.bundle_sha256, image=release.image,
            previous_version=self.previous.version if self.previous and action == "install" else None,
            cohort_cutoff=cutoff, stage=stage, jitter_s=self.params.jitter_s, issued_at=self.clock(), reason=reason)
        self.channel.publish_manifest(sign_rollout(manifest, self.key))
        return sequence

    def _await_acks(self, record: StageRecord, version: str) -> str:
        """Wait for the stage's acknowledgements; the reason to roll back, or ''."""
        deadline = record.started_at + self.params.ack_timeout_s
        waiting = set(record.devices)
        while True:
            statuses = self.channel.statuses()
            for device in list(waiting):
                status = statuses.get(device)
                if status is None or status.get("sequence") != record.sequence:
                    continue
                waiting.discard(device)
                if status.get("state") == "installed" and status.get("version") == version:
                    record.installed.append(device)
                elif status.get("state") in FAILED_STATES:
                    record.failed[device] = f"{status.get('state')}: {status.get('reason') or 'no reason given'}"
                else:
                    record.failed[device] = f"reports {status.get('state')} on {status.get('version')}"
            if record.failed and record.action == "install":
                record.missing = sorted(waiting)
                first = next(iter(sorted(record.failed.items())))
                return f"{len(record.failed)} device(s) failed to install {version} (e.g. {first[0]}: {first[1]})"
            if not waiting:
                record.acked_at = self.clock()
                return ""
            if self.clock() >= deadline:
                record.missing = sorted(waiting)
                record.acked_at = self.clock()
                shown = ", ".join(record.missing[:10]) + (" ..." if len(record.missing) > 10 else "")
                share = len(record.missing) / len(record.devices)
                if record.action == "install" and share > self.params.max_missing_fraction:
                    return (f"{len(record.missing)} of {len(record.devices)} device(s) did not acknowledge within "
                            f"{self.params.ack_timeout_s:g} s: {shown}")
                return ""
            self.sleep(self.poll_s)

    def _watch(self, record: StageRecord) -> str:
        """Watch the stage's health for the stage window; the reason to roll back, or ''.

        Devices that served traffic on the previous version must show some on the new one before the stage
        passes: the window is extended by up to ``ack_timeout_s`` for that (a broker outage delays
        telemetry), and a stage still without evidence then rolls back, health unknown.
        """
        started = record.acked_at or self.clock()
        end = started + self.params.stage_window_s
        give_up = end + self.params.ack_timeout_s
        devices = set(record.installed)
        served_before = record.baseline.requests if record.baseline is not None else 0
        while True:
            summaries = _summaries_of(self.channel.telemetry_since(started), devices, self.target.version)
            record.figures = pool(summaries)
            record.problems = problems(record.figures, record.baseline, self.params, self.drift)
            if record.problems:
                return f"{record.name} unhealthy: " + "; ".join(record.problems)
            now = self.clock()
            if now >= end and (record.figures.requests > 0 or not devices or not served_before):
                return ""
            if now >= give_up:
                record.problems = [f"no requests reported on {self.target.version} by the {len(devices)} updated "
                                   f"device(s) within {give_up - started:g} s (they served {served_before} on "
                                   f"{self.previous.version if self.previous else 'the previous version'})"]
                return f"{record.name}: health unknown: {record.problems[0]}"
            self.sleep(min(self.poll_s, max(0.0, (end if now < end else give_up) - now)))

    # ---- rollback ---------------------------------------------------------------------------------

    def _roll_back(self, reason: str, updated: list[str]) -> RolloutReport:
        self.report.reason = reason
        if self.previous is None:
            self.report.outcome = "failed"
            self.report.reason += "; no previous version to roll back to: the devices stay where they are"
            return self.report
        record = StageRecord("rollback", 100.0, "rollback", self.previous.version, devices=updated)
        self.report.rollback = record
        record.sequence = self._publish("rollback", self.previous, 1.0, "rollback", reason)
        record.started_at = self.clock()
        self.on_step(record)
        if updated:
            self._await_acks(record, self.previous.version)
        else:
            record.acked_at = self.clock()
        record.ended_at = self.clock()
        self.on_step(record)
        self.report.outcome = "rolled_back"
        return self.report
