"""A per-class rollout: every device class of a group gets its own variant, canary, health verdict and rollback.

A registered version chosen per device class (:mod:`tasks.registry.device_choice`) is a :class:`Release`
whose ``classes`` hold one bundle (and images) per class. :class:`ClassRollout` runs one
:class:`~tasks.rollout.engine.Rollout` per class, a *lane*, side by side: each lane draws its canary from
its own class (so every class has one), pools only its own devices' telemetry against their own baseline
(a faster class cannot mask a slower one), and rolls back only its own class. The lanes share the group's one
retained manifest through a :class:`ManifestBoard`: a lane's change (its next stage, its rollback) is
published as the next sequence with every class's current entry (:class:`edge.rollout.ClassRelease`), so a
device always finds its class's latest state, whichever lane published last.

Classes the release has nothing for (``held``: no variant passes their gates) are held where they are; a
class of the group the release does not name at all is left out of the manifest, so its devices refuse it
(``unknown_class``) and keep serving; both end ``held`` in the report, with the reason.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.rollout import ClassRelease, RolloutManifest, sign_rollout
from tasks.config import DriftParams, RolloutParams
from tasks.rollout.engine import (
    Channel,
    ClassOutcome,
    Release,
    Rollout,
    RolloutReport,
    StageRecord,
    new_rollout_id,
)

log = logging.getLogger(__name__)


class ManifestBoard:
    """The group's one retained manifest, shared by the lanes: each change is the next sequence, every class's
    entry in it as the lanes last set them."""

    def __init__(self, channel: Channel, key: Ed25519PrivateKey, params: RolloutParams, rollout_id: str,
                 model_name: str, target: Release, previous: Release | None, held: dict[str, str],
                 clock: Callable[[], float]) -> None:
        self.channel, self.key, self.params, self.clock = channel, key, params, clock
        self.rollout_id, self.model_name, self.target, self.previous = rollout_id, model_name, target, previous
        self.entries = {name: ClassRelease(action="hold", reason=reason[:1000]) for name, reason in held.items()}
        self._lock = threading.Lock()
        self._last_sequence = 0

    def publisher(self, device_class: str) -> Callable[..., int]:
        def publish(action: Literal["install", "rollback"], release: Release, cutoff: float, stage: str,
                    reason: str) -> int:
            return self.publish(device_class, action, release, cutoff, stage, reason)
        return publish

    def publish(self, device_class: str, action: Literal["install", "rollback"], release: Release, cutoff: float,
                stage: str, reason: str = "") -> int:
        with self._lock:
            self.entries[device_class] = ClassRelease(
                action=action, version=release.version, variant=release.variant, runtime=release.runtime,
                bundle_url=release.bundle_url, bundle_sha256=release.bundle_sha256, images=release.images,
                cohort_cutoff=cutoff, reason=reason)
            sequence = max(self.channel.current_sequence(), self._last_sequence) + 1
            self._last_sequence = sequence
            target = self.target
            manifest = RolloutManifest(  # the top level names the release as a whole; devices read their class
                rollout_id=self.rollout_id, group=self.params.group, sequence=sequence, action="install",
                model_name=self.model_name, version=target.version, bundle_url=target.bundle_url,
                bundle_sha256=target.bundle_sha256, image=target.image, images=target.images,
                previous_version=self.previous.version if self.previous else None, cohort_cutoff=1.0,
                stage=f"{device_class}: {stage}"[:32], jitter_s=self.params.jitter_s, issued_at=self.clock(),
                classes=dict(sorted(self.entries.items())))
            self.channel.publish_manifest(sign_rollout(manifest, self.key))
            return sequence


class ClassRollout:
    """One rollout of a per-class ``target`` to ``devices`` (device -> class), a lane per class."""

    def __init__(self, channel: Channel, devices: dict[str, str], key: Ed25519PrivateKey, params: RolloutParams,
                 drift: DriftParams, model_name: str, target: Release, previous: Release | None,
                 clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
                 poll_s: float = 0.5, on_step: Callable[[StageRecord], None] | None = None) -> None:
        if not devices:
            raise ValueError(f"group {params.group} has no devices to roll out to")
        if not target.classes and not target.held:
            raise ValueError(f"{target.version} is not a per-class release: roll it out with Rollout")
        self.channel, self.clock = channel, clock
        members: dict[str, list[str]] = {}
        for device, device_class in sorted(devices.items()):
            members.setdefault(device_class, []).append(device)
        self.report = RolloutReport(new_rollout_id(model_name, target.version), params.group, model_name,
                                    target.version, previous.version if previous else None)
        held = {name: reason for name, reason in target.held.items() if name in members}
        for name in sorted(set(members) - set(target.classes)):
            reason = held.get(name) or (f"{target.version} names no variant for class {name} (not in devices.yaml "
                                        "when it was registered): its devices refuse it and stay where they are")
            self.report.classes[name] = ClassOutcome("held", None, members[name], reason)
        self.board = ManifestBoard(channel, key, params, self.report.rollout_id, model_name, target, previous, held,
                                   clock)
        self.lanes: dict[str, Rollout] = {}
        for name in sorted(set(members) & set(target.classes)):
            mine = target.classes[name]
            before = previous.classes.get(name, previous) if previous is not None else None
            self.lanes[name] = Rollout(channel, members[name], key, params, drift, model_name, mine, before, clock,
                                       sleep, poll_s, on_step, rollout_id=self.report.rollout_id,
                                       publisher=self.board.publisher(name), device_class=name)
            self.report.classes[name] = ClassOutcome("in_progress", mine.variant, members[name])

    def run(self) -> RolloutReport:
        """Every lane to its end, side by side; the report holds each class's outcome and every step. Never raises.

        Each lane runs in a copy of the caller's context: the flow run's (its ``on_step`` artifacts belong to the run)
        and its Prefect settings (a thread started bare sees the process's import-time settings instead)."""
        threads = [threading.Thread(target=contextvars.copy_context().run, args=(lane.run,), name=f"rollout-{name}",
                                    daemon=True) for name, lane in self.lanes.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return self.summarise()

    def summarise(self) -> RolloutReport:
        """The report as the lanes stand (also while they run: the flow's progress artifact)."""
        report = self.report
        steps: list[StageRecord] = []
        for name, lane in self.lanes.items():
            part = lane.report
            steps += part.stages + ([part.rollback] if part.rollback else [])
            report.classes[name].outcome = part.outcome
            report.classes[name].reason = part.reason
        report.stages = sorted(steps, key=lambda step: (step.started_at or float("inf"), step.device_class or ""))
        outcomes = {lane.report.outcome for lane in self.lanes.values()}
        if not self.lanes:
            report.outcome, report.reason = "failed", "no device class of the group has a variant in this release"
        elif "in_progress" in outcomes:
            report.outcome = "in_progress"
        elif "failed" in outcomes:
            report.outcome = "failed"
        elif outcomes == {"completed"}:
            report.outcome = "completed"
        elif outcomes == {"rolled_back"}:
            report.outcome = "rolled_back"
        else:
            report.outcome = "partial"
        if self.lanes and report.outcome != "in_progress":
            report.reason = "; ".join(f"{name}: {lane.report.reason}" for name, lane in self.lanes.items()
                                      if lane.report.reason)
        try:
            report.dropped_messages = self.channel.dropped_messages()
        except Exception:
            log.exception("could not read the channel's dropped-message counts")
        return report
