"""An in-memory fleet that verifies and judges manifests as devices do, a clock, and the rollout they drive: the
fixtures of the rollout engine's unit tests (the transport is the only stand-in; the MQTT path runs against a real
Mosquitto in the integration tests)."""

from __future__ import annotations

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.rollout import judge, resolve_class, verify_rollout
from edge.signing import PublicKey, key_id
from tasks.config import DriftParams, RolloutParams
from tasks.rollout.engine import Release, Rollout

V1 = Release("v1", "file:///bundles/v1.tar.gz", "1" * 64)
V2 = Release("v2", "file:///bundles/v2.tar.gz", "2" * 64)
HEALTHY = {"requests": 100, "errors": 1, "p95_ms": 10.0, "mean_confidence": 0.95}


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += max(seconds, 0.01)


class Fleet:
    """Devices that verify each manifest, apply it when the rules say so, acknowledge, and report telemetry."""

    def __init__(self, key: Ed25519PrivateKey, count: int, clock: Clock, figures=None, failing=(), silent=(),
                 classes: dict[str, int] | None = None):
        self.keys = {key_id(key.public_key()): PublicKey(key.public_key().public_bytes_raw())}
        self.clock, self.figures = clock, figures or {}  # version (or (class, version)) -> telemetry figures
        self.active = {f"dev-{index:03d}": "v1" for index in range(count)}
        self.device_class: dict[str, str] = {}  # classes: class -> how many devices of it (named <class>-NNN)
        for name, members in (classes or {}).items():
            for index in range(members):
                self.active[f"{name}-{index:03d}"] = "v1"
                self.device_class[f"{name}-{index:03d}"] = name
        self.variant = dict.fromkeys(self.active, "before")
        self.last_sequence = dict.fromkeys(self.active, 0)
        self.failing, self.silent = set(failing), set(silent)
        self.sequence, self.status, self.published = 0, {}, []
        self.dropped: dict[str, dict[str, int]] = {}

    @property
    def devices(self) -> list[str]:
        return list(self.active)

    def current_sequence(self) -> int:
        return self.sequence

    def publish_manifest(self, payload: bytes) -> None:
        manifest = verify_rollout(payload, self.keys)
        self.sequence = manifest.sequence
        self.published.append(manifest)
        for device in self.active:
            mine, refusal, reason = resolve_class(manifest, self.device_class.get(device), None)
            if mine is None:  # another class's release, or none for this device
                if refusal != "held" and manifest.sequence > self.last_sequence[device] and device not in self.silent:
                    self.last_sequence[device] = manifest.sequence
                    self.status[device] = {"device": device, "sequence": manifest.sequence, "state": "refused",
                                           "version": self.active[device], "reason": refusal}
                continue
            verdict, reason = judge(mine, device, self.last_sequence[device], self.active[device])
            if verdict in ("stale", "not_in_cohort") or device in self.silent:
                continue
            self.last_sequence[device] = manifest.sequence
            state = "installed"
            if verdict == "apply" and device in self.failing and manifest.action == "install":
                state, reason = "failed", "health_check: the model does not load"
            elif verdict == "apply":
                self.active[device] = mine.version
                entry = manifest.classes.get(self.device_class.get(device, ""))
                self.variant[device] = entry.variant if entry else "whole-fleet"
            elif verdict == "downgrade":
                state = "refused"
            self.status[device] = {"device": device, "sequence": manifest.sequence, "state": state,
                                   "version": self.active[device], "reason": reason}

    def statuses(self) -> dict:
        return dict(self.status)

    def telemetry_since(self, since: float) -> list[dict]:
        return [{"device": device, "version": version, "at": self.clock.now,
                 **self.figures.get((self.device_class.get(device), version), self.figures.get(version, HEALTHY))}
                for device, version in self.active.items()]

    def dropped_messages(self) -> dict[str, dict[str, int]]:
        return {device: dict(reasons) for device, reasons in self.dropped.items()}


def _rollout(fleet: Fleet, key, clock: Clock, previous=V1, **changes) -> Rollout:
    params = RolloutParams(**{"stage_window_s": 5, "ack_timeout_s": 30, "jitter_s": 0, **changes})
    return Rollout(fleet, fleet.devices, key, params, DriftParams(), "edgeloop-digits", V2, previous,
                   clock=clock, sleep=clock.sleep, poll_s=1.0)


def _canary(rollout: Rollout, fleet: Fleet, percent: float = 5) -> set[str]:
    from edge.rollout import cohort_cutoff, cohort_position

    cutoff = cohort_cutoff(rollout.report.rollout_id, fleet.devices, percent)
    return {d for d in fleet.devices if cohort_position(rollout.report.rollout_id, d) <= cutoff}
