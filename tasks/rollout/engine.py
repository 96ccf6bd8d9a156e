"""The rollout state machine: publish a stage, wait for acknowledgements, watch health, widen or roll back.

Transport-free: it talks to the fleet through a :class:`Channel` (MQTT in :mod:`tasks.rollout.channel`,
an in-memory fleet in the unit tests). For each stage of ``rollout.stages`` (canary 5%, 25%, 100%):

1. pool the cohort's telemetry on the previous version from the last ``baseline_window_s`` (the baseline);
2. publish a signed manifest (next sequence, retained) whose cutoff puts exactly the stage's devices in
   the cohort; devices of earlier stages stay in it;
3. wait up to ``ack_timeout_s`` for every cohort device's status for that sequence: ``failed`` or
   ``refused`` installs on two devices (the one device of a single-device stage) roll back at once; a lone
   failure counts like a silent device: devices still silent at the deadline are named, and more failed
   and silent devices together than ``max_missing_fraction`` of the stage rolls back;
4. watch the cohort's telemetry on the new version for ``stage_window_s``: a health problem
   (:func:`tasks.rollout.health.problems`) rolls back as soon as three of the updated devices (all, if
   fewer) have reported, and so does a stage whose devices served traffic before but report none on the
   new version by ``ack_timeout_s`` after the window.

A rollback publishes a manifest signed as ``action: rollback`` to the previous version for the whole group
(devices that never updated acknowledge it as already active) and waits for the updated devices to come
back. The returned :class:`RolloutReport` holds every step with its time, for the flow's records, and the
device messages the channel dropped (per device and reason).

**Fail safe.** :meth:`Rollout.run` never leaves a rollout ``in_progress``: any error while it evaluates a
stage (the channel, the acknowledgements, the health figures, a bug) rolls the stage back, the error
recorded as the reason, and the rollback waits for every device the published stages reached, since
any of them may have installed. Only a rollback that cannot be published ends otherwise: ``failed``,
with the reason saying so and naming the devices that may still run the new version.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.rollout import RolloutManifest, cohort_cutoff, cohort_position, sign_rollout
from tasks.config import DriftParams, RolloutParams
from tasks.rollout.health import Figures, pool, problems

log = logging.getLogger(__name__)
FAILED_STATES = ("failed", "refused")
MAX_REASON_CHARS = 1000  # of a rollback manifest's reason: devices keep it in their state file


class Channel(Protocol):
    def current_sequence(self) -> int: ...
    def publish_manifest(self, payload: bytes) -> None: ...
    def statuses(self) -> dict[str, dict[str, Any]]: ...
    def telemetry_since(self, since: float) -> list[dict[str, Any]]: ...
    def dropped_messages(self) -> dict[str, dict[str, int]]: ...


@dataclass(frozen=True)
class Release:
    """A version devices can fetch: the signed bundle's URL and digest (and the images, for container devices).

    A per-class release (:mod:`tasks.rollout.classes`) also has one :class:`Release` per device class in
    ``classes`` (that class's variant, bundle and images) and says in ``held`` why a class has nothing."""

    version: str
    bundle_url: str
    bundle_sha256: str
    image: str | None = None                                   # amd64's, for devices that predate ``images``
    images: dict[str, str] = field(default_factory=dict)       # arch -> registry/repository@sha256:...
    variant: str | None = None
    runtime: str | None = None                                 # tflite | onnx: what the bundle needs
    classes: dict[str, Release] = field(default_factory=dict)  # device class -> its part of the release
    held: dict[str, str] = field(default_factory=dict)         # device class -> why the release has nothing for it


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
    device_class: str | None = None                        # a per-class rollout: whose stage this is


@dataclass
class ClassOutcome:
    """How one device class's part of a per-class rollout ended (``held``: the release had nothing for it)."""

    outcome: Literal["in_progress", "completed", "rolled_back", "failed", "held"]
    variant: str | None
    devices: list[str]
    reason: str = ""


@dataclass
class RolloutReport:
    rollout_id: str
    group: str
    model_name: str
    target: str
    previous: str | None
    outcome: Literal["in_progress", "completed", "rolled_back", "partial", "failed"] = "in_progress"
    reason: str = ""
    stages: list[StageRecord] = field(default_factory=list)
    rollback: StageRecord | None = None
    dropped_messages: dict[str, dict[str, int]] = field(default_factory=dict)  # device -> reason -> count
    classes: dict[str, ClassOutcome] = field(default_factory=dict)  # a per-class rollout: each class's end

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def new_rollout_id(model_name: str, version: str) -> str:
    return f"{model_name}-{version}-{uuid.uuid4().hex[:8]}"


class Publisher(Protocol):
    """Publishes one lane's change of a per-class rollout; returns the sequence that carried it."""

    def __call__(self, action: Literal["install", "rollback"], release: Release, cutoff: float, stage: str,
                 reason: str) -> int: ...


def _summaries_of(summaries: list[dict[str, Any]], devices: set[str], version: str) -> list[dict[str, Any]]:
    """The summaries ``devices`` sent about ``version``: all of them, so figures pool every request they counted."""
    return [summary for summary in summaries if summary.get("device") in devices and summary.get("version") == version]


class Rollout:
    """One rollout of ``target`` to ``devices`` (one group); :meth:`run` drives it to its end."""

    def __init__(self, channel: Channel, devices: list[str], key: Ed25519PrivateKey, params: RolloutParams,
                 drift: DriftParams, model_name: str, target: Release, previous: Release | None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = 0.5, on_step: Callable[[StageRecord], None] | None = None,
                 rollout_id: str | None = None, publisher: Publisher | None = None,
                 device_class: str | None = None) -> None:
        if not devices:
            raise ValueError(f"group {params.group} has no devices to roll out to")
        self.channel, self.devices, self.key, self.params, self.drift = channel, sorted(devices), key, params, drift
        self.target, self.previous, self.clock, self.sleep, self.poll_s = target, previous, clock, sleep, poll_s
        self.on_step = on_step or (lambda record: None)
        self.publisher, self.device_class = publisher, device_class  # one class's lane of a per-class rollout
        self._last_sequence = 0  # the highest sequence this rollout tried to publish
        self.report = RolloutReport(rollout_id or new_rollout_id(model_name, target.version), params.group,
                                    model_name, target.version, previous.version if previous else None)

    # ---- the stages -------------------------------------------------------------------------------

    def run(self) -> RolloutReport:
        """Drive the stages to ``completed``, ``rolled_back`` or (no rollback possible) ``failed``; never raises."""
        updated: list[str] = []
        reached: set[str] = set()  # devices of every stage whose manifest went out (or may have)
        try:
            for index, percent in enumerate(self.params.stages):
                name = "canary" if index == 0 else f"{percent:g}%"
                cutoff = cohort_cutoff(self.report.rollout_id, self.devices, percent)
                cohort = [d for d in self.devices if cohort_position(self.report.rollout_id, d) <= cutoff]
                record = StageRecord(name, percent, "install", self.target.version, devices=cohort,
                                     device_class=self.device_class)
                self.report.stages.append(record)
                reason = self._stage(record, cutoff, reached)
                updated = sorted(set(updated) | set(record.installed))
                if reason:
                    return self._roll_back(reason, updated)
            self.report.outcome = "completed"
            return self.report
        except Exception as error:  # fail safe: whatever broke, the stage goes back
            problem = f"evaluation error ({type(error).__name__}: {error})"
            name = self.report.stages[-1].name if self.report.stages else "rollout"
            log.exception("rollout %s: evaluating %s failed; rolling back", self.report.rollout_id, name)
            if self.report.stages:
                self.report.stages[-1].problems.append(problem)
                self.report.stages[-1].ended_at = self.report.stages[-1].ended_at or self.clock()
            return self._roll_back(f"{name}: {problem}; fail safe: roll back", sorted(reached | set(updated)))
        finally:
            try:
                self.report.dropped_messages = self.channel.dropped_messages()
            except Exception:
                log.exception("could not read the channel's dropped-message counts")

    def _stage(self, record: StageRecord, cutoff: float, reached: set[str]) -> str:
        """Publish one stage, wait for its acknowledgements, watch its health; the reason to roll back, or ''."""
        record.baseline = self._baseline(record.devices)
        reached.update(record.devices)
        record.sequence = self._publish("install", self.target, cutoff, record.name)
        record.started_at = self.clock()
        self._step(record)
        reason = self._await_acks(record, self.target.version)
        if not reason:
            reason = self._watch(record)
        record.ended_at = self.clock()
        self._step(record)
        return reason

    def _step(self, record: StageRecord) -> None:
        """Tell the caller about a step; its records failing must not steer the fleet."""
        try:
            self.on_step(record)
        except Exception:
            log.exception("recording step %s of rollout %s failed", record.name, self.report.rollout_id)

    def _baseline(self, cohort: list[str]) -> Figures | None:
        if self.previous is None:
            return None
        since = self.clock() - self.params.baseline_window_s
        summaries = _summaries_of(self.channel.telemetry_since(since), set(cohort), self.previous.version)
        return pool(summaries) if summaries else None

    def _publish(self, action: Literal["install", "rollback"], release: Release, cutoff: float, stage: str,
                 reason: str = "") -> int:
        if self.publisher is not None:  # one class's lane: its entry of the group's manifest
            self._last_sequence = self.publisher(action, release, cutoff, stage, reason)
            return self._last_sequence
        sequence = max(self.channel.current_sequence(), self._last_sequence) + 1  # after one that may have gone out
        self._last_sequence = sequence
        manifest = RolloutManifest(
            rollout_id=self.report.rollout_id, group=self.params.group, sequence=sequence, action=action,
            model_name=self.report.model_name, version=release.version, bundle_url=release.bundle_url,
            bundle_sha256=release.bundle_sha256, image=release.image, images=release.images,
            previous_version=self.previous.version if self.previous and action == "install" else None,
            cohort_cutoff=cutoff, stage=stage, jitter_s=self.params.jitter_s, issued_at=self.clock(), reason=reason)
        self.channel.publish_manifest(sign_rollout(manifest, self.key))
        return sequence

    def _await_acks(self, record: StageRecord, version: str) -> str:
        """Wait for the stage's acknowledgements; the reason to roll back, or ''.

        Install failures roll back at once when two devices report one (the device, in a stage of one), so
        a single device, hostile or broken, cannot veto a stage by itself: a lone failure counts with the
        silent devices against ``max_missing_fraction`` once every other device has answered or the
        deadline has passed.
        """
        deadline = record.started_at + self.params.ack_timeout_s
        waiting = set(record.devices)
        failures_needed = min(2, len(record.devices))
        while True:
            self._collect_acks(record, waiting, version)
            if record.action == "install" and len(record.failed) >= failures_needed:
                record.missing = sorted(waiting)
                return self._install_failures(record, version)
            if waiting and self.clock() < deadline:
                self.sleep(self.poll_s)
                continue
            record.missing = sorted(waiting)
            record.acked_at = self.clock()
            unanswered = len(record.missing) + len(record.failed)
            if record.action == "install" and unanswered / len(record.devices) > self.params.max_missing_fraction:
                return "; ".join(filter(None, [self._install_failures(record, version), self._silent(record)]))
            return ""

    def _collect_acks(self, record: StageRecord, waiting: set[str], version: str) -> None:
        """Move every device whose status answers the stage's sequence from ``waiting`` to installed or failed."""
        statuses = self.channel.statuses()
        published = max(self._last_sequence, self.channel.current_sequence())
        for device in sorted(waiting):
            status = statuses.get(device)
            sequence = status.get("sequence") if status is not None else None
            if not isinstance(sequence, int) or not record.sequence <= sequence <= published:
                continue  # later than the stage's: another class's change of the manifest, acknowledged too
            waiting.discard(device)
            if status.get("state") == "installed" and status.get("version") == version:
                record.installed.append(device)
            elif status.get("state") in FAILED_STATES:
                record.failed[device] = f"{status.get('state')}: {status.get('reason') or 'no reason given'}"
            else:
                record.failed[device] = f"reports {status.get('state')} on {status.get('version')}"

    @staticmethod
    def _install_failures(record: StageRecord, version: str) -> str:
        if not record.failed:
            return ""
        first = next(iter(sorted(record.failed.items())))
        return f"{len(record.failed)} device(s) failed to install {version} (e.g. {first[0]}: {first[1]})"

    def _silent(self, record: StageRecord) -> str:
        if not record.missing:
            return ""
        shown = ", ".join(record.missing[:10]) + (" ..." if len(record.missing) > 10 else "")
        return (f"{len(record.missing)} of {len(record.devices)} device(s) did not acknowledge within "
                f"{self.params.ack_timeout_s:g} s: {shown}")

    def _watch(self, record: StageRecord) -> str:
        """Watch the stage's health for the stage window; the reason to roll back, or ''.

        A health problem rolls back at once when at least three of the updated devices (all of them, if
        fewer) have reported traffic, so the first device to report never decides for the others; with fewer
        reporting, the problem stands only once the window is over and no more came within ``ack_timeout_s``.
        Devices that served traffic on the previous version must show some on the new one before the stage
        passes (two of them when two or more served before, so one device's figures alone are no evidence):
        the window is extended by up to ``ack_timeout_s`` for that (a broker outage delays telemetry), and a
        stage still without evidence then rolls back, health unknown.
        """
        started = record.acked_at or self.clock()
        end = started + self.params.stage_window_s
        give_up = end + self.params.ack_timeout_s
        devices = set(record.installed)
        before = record.baseline.by_device if record.baseline is not None else {}
        served = sorted(d for d in devices if d in before and before[d].requests > 0)
        needed, quorum = min(2, len(served)), min(3, len(devices))
        while True:
            summaries = _summaries_of(self.channel.telemetry_since(started), devices, self.target.version)
            record.figures = pool(summaries)
            record.problems = problems(record.figures, record.baseline, self.params, self.drift)
            now, reporting = self.clock(), record.figures.reporting()
            if record.problems and (reporting >= quorum or now >= give_up):
                return f"{record.name} unhealthy: " + "; ".join(record.problems)
            if now >= end and not record.problems and (reporting >= needed or not devices):
                return ""
            if now >= give_up:
                previous = self.previous.version if self.previous else "the previous version"
                record.problems = [f"no requests reported on {self.target.version} by the {len(devices)} updated "
                                   f"device(s) within {give_up - started:g} s (they served "
                                   f"{sum(before[d].requests for d in served)} on {previous})" if not reporting else
                                   f"requests on {self.target.version} reported by {reporting} of the {len(devices)} "
                                   f"updated device(s) within {give_up - started:g} s; {needed} of the {len(served)} "
                                   f"that served {previous} must report"]
                return f"{record.name}: health unknown: {record.problems[0]}"
            self.sleep(min(self.poll_s, max(0.0, (end if now < end else give_up) - now)))

    # ---- rollback ---------------------------------------------------------------------------------

    def _roll_back(self, reason: str, updated: list[str]) -> RolloutReport:
        """Publish the signed rollback to the previous version and wait for ``updated`` to acknowledge it."""
        self.report.reason = reason
        if self.previous is None:
            self.report.outcome = "failed"
            self.report.reason += "; no previous version to roll back to: the devices stay where they are"
            return self.report
        record = StageRecord("rollback", 100.0, "rollback", self.previous.version, devices=updated,
                             device_class=self.device_class)
        self.report.rollback = record
        try:
            record.sequence = self._publish("rollback", self.previous, 1.0, "rollback", reason[:MAX_REASON_CHARS])
        except Exception as error:
            log.exception("rollout %s: publishing the rollback failed", self.report.rollout_id)
            shown = ", ".join(updated[:10]) + (" ..." if len(updated) > 10 else "")
            record.problems.append(f"not published ({type(error).__name__}: {error})")
            self.report.outcome = "failed"
            self.report.reason += (f"; the rollback to {self.previous.version} was NOT published "
                                   f"({type(error).__name__}: {error}): the group is half-installed, "
                                   f"{len(updated)} device(s) may still run {self.target.version}"
                                   f"{': ' + shown if shown else ''}")
            return self.report
        self.report.outcome = "rolled_back"
        record.started_at = self.clock()
        self._step(record)
        try:
            if updated:
                self._await_acks(record, self.previous.version)
            else:
                record.acked_at = self.clock()
        except Exception as error:  # published: the devices roll back; only our tracking of it broke
            log.exception("rollout %s: tracking the rollback's acknowledgements failed", self.report.rollout_id)
            record.problems.append(f"acknowledgements not tracked ({type(error).__name__}: {error})")
            self.report.reason += f"; the rollback was published, its acknowledgements could not be tracked ({error})"
        record.ended_at = self.clock()
        self._step(record)
        return self.report
