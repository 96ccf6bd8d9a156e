"""The rollout state machine against an in-memory fleet that verifies and judges manifests as devices do.

The transport is the only stand-in here (the MQTT path runs against a real Mosquitto in the integration
tests); every manifest is signed and verified with real keys and the devices' own rules.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.rollout import judge, verify_rollout
from edge.signing import key_id
from tasks.config import DriftParams, RolloutParams
from tasks.rollout.engine import Release, Rollout
from tasks.rollout.health import Figures, pool, problems

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

    def __init__(self, key: Ed25519PrivateKey, count: int, clock: Clock, figures=None, failing=(), silent=()):
        self.keys = {key_id(key.public_key()): key.public_key()}
        self.clock, self.figures = clock, figures or {}
        self.active = {f"dev-{index:03d}": "v1" for index in range(count)}
        self.last_sequence = dict.fromkeys(self.active, 0)
        self.failing, self.silent = set(failing), set(silent)
        self.sequence, self.status, self.published = 0, {}, []

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
            verdict, reason = judge(manifest, device, self.last_sequence[device], self.active[device])
            if verdict in ("stale", "not_in_cohort") or device in self.silent:
                continue
            self.last_sequence[device] = manifest.sequence
            state = "installed"
            if verdict == "apply" and device in self.failing and manifest.action == "install":
                state, reason = "failed", "health_check: the model does not load"
            elif verdict == "apply":
                self.active[device] = manifest.version
            elif verdict == "downgrade":
                state = "refused"
            self.status[device] = {"device": device, "sequence": manifest.sequence, "state": state,
                                   "version": self.active[device], "reason": reason}

    def statuses(self) -> dict:
        return dict(self.status)

    def telemetry_since(self, since: float) -> list[dict]:
        return [{"device": device, "version": version, "at": self.clock.now,
                 **self.figures.get(version, HEALTHY)} for device, version in self.active.items()]


def _rollout(fleet: Fleet, key, clock: Clock, previous=V1, **changes) -> Rollout:
    params = RolloutParams(**{"stage_window_s": 5, "ack_timeout_s": 30, "jitter_s": 0, **changes})
    return Rollout(fleet, fleet.devices, key, params, DriftParams(), "edgeloop-digits", V2, previous,
                   clock=clock, sleep=clock.sleep, poll_s=1.0)


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def test_a_healthy_rollout_widens_from_the_canary_to_the_whole_group(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock)
    report = _rollout(fleet, key, clock).run()
    assert report.outcome == "completed" and set(fleet.active.values()) == {"v2"}
    assert [len(stage.devices) for stage in report.stages] == [2, 10, 40]  # 5% and 25% of 40, then all
    canary, middle, _ = (set(stage.devices) for stage in report.stages)
    assert canary <= middle  # widening keeps the canary in
    assert [m.sequence for m in fleet.published] == [1, 2, 3] and report.stages[0].baseline.p95_ms == 10.0


def test_a_small_group_still_gets_a_canary_of_one(key):
    clock = Clock()
    fleet = Fleet(key, 3, clock)
    report = _rollout(fleet, key, clock).run()
    assert [len(stage.devices) for stage in report.stages] == [1, 1, 3]


def test_a_failed_install_rolls_every_updated_device_back(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock)
    rollout = _rollout(fleet, key, clock)
    fleet.failing = set(fleet.devices) - _canary(rollout, fleet)  # the canary installs, the next stage fails
    report = rollout.run()
    assert report.outcome == "rolled_back" and "failed to install v2" in report.reason
    assert report.stages[-1].name == "25%" and report.rollback.version == "v1"
    assert set(fleet.active.values()) == {"v1"}  # the canary came back
    assert fleet.published[-1].action == "rollback" and fleet.published[-1].cohort_cutoff == 1.0
    assert sorted(report.rollback.installed) == sorted(report.rollback.devices)


def _canary(rollout: Rollout, fleet: Fleet, percent: float = 5) -> set[str]:
    from edge.rollout import cohort_cutoff, cohort_position

    cutoff = cohort_cutoff(rollout.report.rollout_id, fleet.devices, percent)
    return {d for d in fleet.devices if cohort_position(rollout.report.rollout_id, d) <= cutoff}


def test_a_slower_version_is_rolled_back_at_the_canary(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock, figures={"v2": {**HEALTHY, "p95_ms": 25.0}})
    report = _rollout(fleet, key, clock).run()
    assert report.outcome == "rolled_back" and len(report.stages) == 1
    assert "p95 latency 25.0 ms > 1.5 x 10.0 ms (previous version) and 5 ms more" in report.reason
    assert set(fleet.active.values()) == {"v1"}
    jitter = Fleet(key, 40, clock, figures={"v1": {**HEALTHY, "p95_ms": 0.4}, "v2": {**HEALTHY, "p95_ms": 2.1}})
    assert _rollout(jitter, key, clock).run().outcome == "completed"  # 5x, but 1.7 ms: noise, not a slowdown


def test_silent_devices_are_named_and_the_rollout_does_not_wait_forever(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock)
    fleet.silent = set(fleet.devices)  # the whole group is offline
    started = clock.now
    report = _rollout(fleet, key, clock, ack_timeout_s=30).run()
    assert report.outcome == "rolled_back" and "did not acknowledge within 30 s" in report.reason
    assert report.stages[0].missing == report.stages[0].devices
    assert clock.now - started < 120


def test_tolerated_silence_goes_on_and_still_names_the_devices(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock)
    rollout = _rollout(fleet, key, clock, max_missing_fraction=0.2)
    quiet = sorted(set(fleet.devices) - _canary(rollout, fleet, 25))[:4]  # 4 of 40 (10%), only in the last stage
    fleet.silent = set(quiet)
    report = rollout.run()
    assert report.outcome == "completed" and set(report.stages[-1].missing) == set(quiet)


def test_devices_that_go_quiet_after_the_update_roll_back_after_waiting_for_evidence(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock, figures={"v2": {**HEALTHY, "requests": 0}})  # acked, then no requests served
    started = clock.now
    report = _rollout(fleet, key, clock, stage_window_s=5, ack_timeout_s=30).run()
    assert report.outcome == "rolled_back" and len(report.stages) == 1
    assert "health unknown: no requests reported on v2 by the 2 updated device(s)" in report.reason
    assert 35 <= clock.now - started < 60  # the window, then up to ack_timeout_s more for late telemetry
    idle = Fleet(key, 10, clock, figures={"v1": {**HEALTHY, "requests": 0}, "v2": {**HEALTHY, "requests": 0}})
    assert _rollout(idle, key, clock).run().outcome == "completed"  # no traffic before either: acks decide


def test_without_a_previous_version_a_bad_stage_fails_without_rollback(key):
    clock = Clock()
    fleet = Fleet(key, 10, clock, figures={"v2": {**HEALTHY, "errors": 50}})
    report = _rollout(fleet, key, clock, previous=None).run()
    assert report.outcome == "failed" and "no previous version" in report.reason


def test_health_problems_against_the_baseline_and_the_absolute_limits():
    params, drift = RolloutParams(), DriftParams()
    base = pool([{"device": "a", **HEALTHY}, {"device": "b", **HEALTHY}])
    assert base == Figures(2, 200, 0.01, 10.0, 0.95)
    bad = Figures(2, 200, 0.05, 10.0, 0.80)
    found = problems(bad, base, params, drift)
    assert any(p.startswith("error rate 0.050 > 0.010") for p in found)
    assert any(p.startswith("mean confidence 0.800 < 0.950") for p in found)
    assert problems(Figures(1, 10, 0.0, 250.0, 0.9), None, params, drift) == [
        "p95 latency 250.0 ms > 200 ms (no baseline)"]
    assert problems(Figures(1, 0), base, params, drift) == []  # no traffic, no evidence


def test_stages_are_validated():
    for stages in ([25, 5, 100], [5, 25], [0, 100], []):
        with pytest.raises(ValueError):
            RolloutParams(stages=stages)
