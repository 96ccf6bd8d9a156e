"""The rollout engine under faults and hostile reports: an error while a stage is evaluated (the channel, telemetry,
a publish) rolls the stage back with the reason; the report carries what the channel dropped; one device's
report is neither enough evidence nor the deciding one. Same in-memory fleet as test_rollout_engine.py
(tests/unit/rollout_fakes.py).
"""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from tests.unit.rollout_fakes import HEALTHY, Clock, Fleet, _canary, _rollout


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()

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
