"""The rollout state machine against an in-memory fleet that verifies and judges manifests as devices do.

The transport is the only stand-in here (the MQTT path runs against a real Mosquitto in the integration
tests); every manifest is signed and verified with real keys and the devices' own rules.
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tasks.config import DriftParams, RolloutParams
from tasks.rollout.health import Figures, pool, problems
from tests.unit.rollout_fakes import HEALTHY, Clock, Fleet, _canary, _rollout


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


def test_failed_installs_on_two_devices_roll_every_updated_device_back_at_once(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock)
    rollout = _rollout(fleet, key, clock)
    fleet.failing = set(fleet.devices) - _canary(rollout, fleet)  # the canary installs, the next stage fails
    started = clock.now
    report = rollout.run()
    assert report.outcome == "rolled_back" and "8 device(s) failed to install v2" in report.reason
    assert report.stages[-1].name == "25%" and report.rollback.version == "v1"
    assert clock.now - started < 30  # at once: two failures are enough, nobody waits for the deadline
    assert set(fleet.active.values()) == {"v1"}  # the canary came back
    assert fleet.published[-1].action == "rollback" and fleet.published[-1].cohort_cutoff == 1.0
    assert sorted(report.rollback.installed) == sorted(report.rollback.devices)


def test_one_failed_install_counts_like_a_silent_device_not_as_a_veto(key):
    """One device, hostile or broken, reporting a failure cannot roll a stage back by itself: it is one of the
    devices that did not take the update, tolerated up to ``max_missing_fraction`` like a silent one."""
    clock = Clock()
    fleet = Fleet(key, 40, clock)
    rollout = _rollout(fleet, key, clock, max_missing_fraction=0.1)
    liar = sorted(set(fleet.devices) - _canary(rollout, fleet, 25))[0]  # in the last stage only
    fleet.failing = {liar}
    report = rollout.run()
    assert report.outcome == "completed", report.reason
    assert list(report.stages[-1].failed) == [liar] and liar not in report.stages[-1].installed
    assert fleet.active[liar] == "v1" and set(fleet.active.values()) == {"v1", "v2"}

    strict = Fleet(key, 40, clock)  # no tolerance (the default): the stage rolls back once the others answered
    rollout = _rollout(strict, key, clock)
    strict.failing = {sorted(_canary(rollout, strict))[0]}
    report = rollout.run()
    assert report.outcome == "rolled_back" and "1 device(s) failed to install v2" in report.reason
    assert report.stages[0].installed and report.stages[0].acked_at is not None  # the others were heard first
    assert set(strict.active.values()) == {"v1"}


def test_in_a_stage_of_one_device_its_failure_rolls_back_at_once(key):
    clock = Clock()
    fleet = Fleet(key, 3, clock)
    rollout = _rollout(fleet, key, clock, max_missing_fraction=0.5)
    fleet.failing = _canary(rollout, fleet)
    assert len(fleet.failing) == 1
    report = rollout.run()
    assert report.outcome == "rolled_back" and len(report.stages) == 1 and "failed to install v2" in report.reason


def test_silence_and_a_failure_together_are_held_against_the_tolerance(key):
    clock = Clock()
    fleet = Fleet(key, 40, clock)
    rollout = _rollout(fleet, key, clock, max_missing_fraction=0.05)  # 2 of 40 tolerated, 3 are not
    late = sorted(set(fleet.devices) - _canary(rollout, fleet, 25))
    fleet.failing, fleet.silent = {late[0]}, {late[1], late[2]}
    report = rollout.run()
    assert report.outcome == "rolled_back" and report.stages[-1].name == "100%"
    assert f"1 device(s) failed to install v2 (e.g. {late[0]}" in report.reason
    assert "2 of 40 device(s) did not acknowledge within 30 s" in report.reason


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
    assert (base.devices, base.requests, base.error_rate, base.p95_ms, base.mean_confidence) == (2, 200, 0.01, 10.0,
                                                                                                0.95)
    bad = Figures(2, 200, 0.05, 10.0, 0.80)
    found = problems(bad, base, params, drift)
    assert any(p.startswith("error rate 0.050 > 0.010") for p in found)
    assert any(p.startswith("mean confidence 0.800 < 0.950") for p in found)
    assert problems(Figures(1, 10, 0.0, 250.0, 0.9), None, params, drift) == [
        "p95 latency 250.0 ms > 200 ms (no baseline) (1 of 1 device(s) over the limit)"]
    assert problems(Figures(1, 0), base, params, drift) == []  # no traffic, no evidence


def test_stages_are_validated():
    for stages in ([25, 5, 100], [5, 25], [0, 100], []):
        with pytest.raises(ValueError):
            RolloutParams(stages=stages)
