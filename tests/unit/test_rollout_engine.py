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

    def dropped_messages(self) -> dict[str, dict[str, int]]:
        return {device: dict(reasons) for device, reasons in self.dropped.items()}


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


# ---- fail safe: an error while a stage is evaluated rolls the stage back ------------------------------

class Breaking(Fleet):
    """A fleet whose channel raises ``error`` from ``method`` on calls ``first`` to ``last`` (1-based)."""

    def __init__(self, *args, method: str, first: int, last: int = 10**9, error: Exception | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.method, self.first, self.last, self.calls = method, first, last, 0
        self.error = error or RuntimeError("the channel broke")

    def _maybe_break(self, method: str) -> None:
        if method == self.method:
            self.calls += 1
            if self.first <= self.calls <= self.last:
                raise self.error

    def statuses(self) -> dict:
        self._maybe_break("statuses")
        return super().statuses()

    def telemetry_since(self, since: float) -> list[dict]:
        self._maybe_break("telemetry_since")
        return super().telemetry_since(since)

    def publish_manifest(self, payload: bytes) -> None:
        self._maybe_break("publish_manifest")
        super().publish_manifest(payload)


@pytest.mark.parametrize("method, first, last", [
    ("telemetry_since", 3, 3),     # the canary's watch: the baseline read (1) and a first look (2) went fine
    ("statuses", 1, 1),            # the canary's acknowledgements, once
    ("telemetry_since", 4, 10**9),  # from the canary's watch on, for good (the rollback needs no telemetry)
])
def test_an_error_mid_stage_rolls_the_stage_back_with_the_reason(key, method, first, last):
    clock = Clock()
    fleet = Breaking(key, 40, clock, method=method, first=first, last=last)
    report = _rollout(fleet, key, clock, stage_window_s=30).run()
    assert report.outcome == "rolled_back", report.reason
    assert "evaluation error (RuntimeError: the channel broke); fail safe: roll back" in report.reason
    assert report.reason.startswith("canary: ") and "the channel broke" in report.stages[0].problems[-1]
    assert fleet.published[-1].action == "rollback" and fleet.published[-1].version == "v1"
    assert set(fleet.active.values()) == {"v1"}  # the canary is back: nobody is left half-installed
    assert sorted(report.rollback.devices) == sorted(report.stages[0].devices)  # every device it may have reached
    assert sorted(report.rollback.installed) == sorted(report.rollback.devices)


def test_telemetry_a_channel_passed_unchecked_rolls_back_instead_of_raising(key):
    """The issue's case: a string for ``requests`` used to make run() raise with the canary on v2."""
    clock = Clock()
    fleet = Fleet(key, 40, clock, figures={"v2": {**HEALTHY, "requests": "a lot"}})
    report = _rollout(fleet, key, clock).run()
    assert report.outcome == "rolled_back" and "ValueError" in report.reason
    assert set(fleet.active.values()) == {"v1"} and fleet.published[-1].action == "rollback"


def test_a_rollback_whose_acknowledgements_cannot_be_tracked_is_still_rolled_back(key):
    clock = Clock()
    fleet = Breaking(key, 40, clock, method="statuses", first=2)  # the canary's acks, and every read after
    report = _rollout(fleet, key, clock).run()
    assert report.outcome == "rolled_back" and fleet.published[-1].action == "rollback"
    assert "its acknowledgements could not be tracked" in report.reason
    assert set(fleet.active.values()) == {"v1"}


def test_a_rollback_that_cannot_be_published_says_so_plainly(key):
    clock = Clock()
    fleet = Breaking(key, 40, clock, method="publish_manifest", first=2,
                     error=ConnectionError("broker gone"))  # the canary went out; nothing after it does
    rollout = _rollout(fleet, key, clock)
    report = rollout.run()
    canary = _canary(rollout, fleet)
    reached = sorted(report.stages[1].devices)  # the 25% stage's manifest may have gone out before the error
    assert report.outcome == "failed" and report.reason.startswith("25%: evaluation error (ConnectionError")
    assert "the rollback to v1 was NOT published (ConnectionError: broker gone)" in report.reason
    assert f"{len(reached)} device(s) may still run v2: {', '.join(reached[:10])}" in report.reason
    assert {fleet.active[device] for device in canary} == {"v2"} and canary <= set(reached)  # what it warns about


def test_a_publish_that_may_have_reached_the_devices_is_followed_by_a_higher_sequence(key):
    """A manifest whose PUBACK never came may still have been applied: the rollback must not reuse its sequence."""
    clock = Clock()

    class LostAck(Fleet):
        def publish_manifest(self, payload: bytes) -> None:
            super().publish_manifest(payload)
            if len(self.published) == 2:  # the second stage reached the devices, the acknowledgement did not
                self.sequence = 1
                raise TimeoutError("no PUBACK")

    fleet = LostAck(key, 40, clock)
    report = _rollout(fleet, key, clock).run()
    assert report.outcome == "rolled_back" and "TimeoutError: no PUBACK" in report.reason
    assert [m.sequence for m in fleet.published] == [1, 2, 3] and fleet.published[-1].action == "rollback"
    assert set(fleet.active.values()) == {"v1"}  # the second stage's devices came back too


def test_the_report_carries_the_channels_dropped_message_counts(key):
    clock = Clock()
    fleet = Fleet(key, 10, clock)
    fleet.dropped = {"dev-003": {"not_json": 2, "invalid": 5}}
    report = _rollout(fleet, key, clock).run()
    assert report.outcome == "completed" and report.dropped_messages == {"dev-003": {"not_json": 2, "invalid": 5}}
    assert report.as_dict()["dropped_messages"] == {"dev-003": {"not_json": 2, "invalid": 5}}


def test_one_device_reporting_traffic_is_no_evidence_for_a_stage_where_several_served_before(key):
    """Two canary devices served v1; on v2 only one reports requests (the other's service went quiet)."""
    clock = Clock()

    class OneTalks(Fleet):
        def telemetry_since(self, since: float) -> list[dict]:
            talking = min(device for device, version in self.active.items() if version == "v2") \
                if "v2" in self.active.values() else None
            return [{**summary, "requests": 0, "errors": 0} if summary["version"] == "v2" and
                    summary["device"] != talking else summary for summary in super().telemetry_since(since)]

    fleet = OneTalks(key, 40, clock)
    report = _rollout(fleet, key, clock).run()
    assert report.outcome == "rolled_back" and len(report.stages) == 1, report.reason
    assert "health unknown: requests on v2 reported by 1 of the 2 updated device(s)" in report.reason
    assert "2 of the 2 that served v1 must report" in report.reason


def test_the_records_sum_dropped_messages_per_reason():
    from tasks.rollout.engine import RolloutReport
    from tasks.rollout.records import dropped_by_reason, dropped_summary

    report = RolloutReport("r", "lab", "m", "v2", "v1",
                           dropped_messages={"sim-3": {"invalid": 4, "not_json": 2}, "sim-2": {"invalid": 1}})
    assert dropped_by_reason(report) == {"invalid": 5, "not_json": 2}
    assert dropped_summary(report) == ("7 device message(s) dropped (invalid 5, not_json 2) from 2 device(s): "
                                       "sim-2, sim-3")
    assert dropped_summary(RolloutReport("r", "lab", "m", "v2", "v1")) == ""


def test_the_first_device_to_report_does_not_decide_for_the_stage(key):
    """A saboteur reports absurd figures at once; the three honest devices of the stage report 2 s later."""
    clock = Clock()
    absurd = {"requests": 10**9, "errors": 10**9, "p95_ms": 3_600_000.0, "mean_confidence": 0.0}

    class FirstToReport(Fleet):
        def telemetry_since(self, since: float) -> list[dict]:
            summaries = super().telemetry_since(since)
            if not self.published:
                return summaries
            late = clock.now < self.published[-1].issued_at + 2.0
            return [{**summary, **absurd} if summary["device"] == "dev-000" and summary["version"] == "v2" else summary
                    for summary in summaries
                    if not (late and summary["version"] == "v2" and summary["device"] != "dev-000")]

    fleet = FirstToReport(key, 4, clock)
    report = _rollout(fleet, key, clock, stages=[100]).run()
    assert report.outcome == "completed", report.reason
    assert report.stages[0].figures.by_device["dev-000"].requests == 10**9 and report.stages[0].figures.requests == 400
    alone = FirstToReport(key, 4, clock)  # the honest three never report: the saboteur is all there is, at the end
    alone.figures = {"v2": {**HEALTHY, "requests": 0, "errors": 0}}
    report = _rollout(alone, key, clock, stages=[100]).run()
    assert report.outcome == "rolled_back" and "(1 of 1 device(s) over the limit)" in report.reason
