"""No single device decides a stage's health: per-device figures, capped weights, trimmed means across devices."""

from __future__ import annotations

import pytest

from tasks.config import DriftParams, RolloutParams
from tasks.rollout.health import pool, problems, robust_mean

PARAMS, DRIFT = RolloutParams(), DriftParams()
HEALTHY = {"requests": 100, "errors": 1, "p95_ms": 10.0, "mean_confidence": 0.95}
REGRESSED = {"requests": 100, "errors": 10, "p95_ms": 40.0, "mean_confidence": 0.70}  # all three limits broken
LIAR = {"requests": 10**9, "errors": 0, "p95_ms": 0.001, "mean_confidence": 1.0}  # finite, within schema, absurd
SABOTEUR = {"requests": 10**9, "errors": 10**9, "p95_ms": 3_600_000.0, "mean_confidence": 0.0}


def _stage(figures: dict[str, dict], version: str = "v2"):
    return pool([{"device": device, "version": version, **values} for device, values in figures.items()])


def _verdict(before: dict[str, dict], after: dict[str, dict]) -> list[str]:
    return problems(_stage(after), _stage(before, "v1"), PARAMS, DRIFT)


HONEST = ["a", "b", "c"]


def test_one_device_with_a_billion_requests_cannot_hide_three_real_problems():
    before = {**{d: HEALTHY for d in HONEST}, "liar": HEALTHY}
    after = {**{d: REGRESSED for d in HONEST}, "liar": LIAR}
    found = _verdict(before, after)
    assert [p.split(" ")[0] + " " + p.split(" ")[1] for p in found] == ["error rate", "p95 latency", "mean confidence"]
    assert all("(3 of 4 device(s) over the limit)" in p for p in found)
    pooled_by_requests = sum(v["errors"] for v in after.values()) / sum(v["requests"] for v in after.values())
    assert pooled_by_requests < 1e-6  # what pooling every request used to report: the problems vanished
    stage = _stage(after)
    assert stage.requests == 400  # the liar counts as much as a typical device, not 10^9
    assert stage.error_rate == pytest.approx(0.1) and stage.p95_ms == pytest.approx(40.0)


def test_one_device_cannot_hide_the_others_problems_by_lying_about_the_baseline_either():
    before = {**{d: HEALTHY for d in HONEST}, "liar": {**SABOTEUR, "errors": 10**8}}  # a terrible "before"
    after = {**{d: REGRESSED for d in HONEST}, "liar": SABOTEUR}
    assert len(_verdict(before, after)) == 3


def test_one_outlier_cannot_roll_back_a_healthy_stage():
    before = {**{d: HEALTHY for d in HONEST}, "saboteur": HEALTHY}
    after = {**{d: HEALTHY for d in HONEST}, "saboteur": SABOTEUR}
    assert _verdict(before, after) == []
    assert _verdict({}, after) == []  # against the absolute limits too (no baseline)


def test_heterogeneous_devices_are_each_judged_against_their_own_before():
    """Fast and slow hardware, unchanged; a liar at both extremes (fast before, slow after) changes nothing."""
    before = {"a": HEALTHY, "b": HEALTHY, "c": {**HEALTHY, "p95_ms": 30.0}, "liar": {**HEALTHY, "p95_ms": 1.0}}
    after = {"a": HEALTHY, "b": HEALTHY, "c": {**HEALTHY, "p95_ms": 30.0}, "liar": {**HEALTHY, "p95_ms": 100.0}}
    assert _verdict(before, after) == []
    slower = {**after, "a": {**HEALTHY, "p95_ms": 20.0}, "b": {**HEALTHY, "p95_ms": 20.0},
              "c": {**HEALTHY, "p95_ms": 60.0}, "liar": {**HEALTHY, "p95_ms": 1.0}}  # every honest one 2x slower
    assert [p[:11] for p in _verdict(before, slower)] == ["p95 latency"]


def test_a_single_device_stage_still_decides_on_its_own():
    assert len(_verdict({"only": HEALTHY}, {"only": REGRESSED})) == 3
    assert _verdict({"only": HEALTHY}, {"only": HEALTHY}) == []
    assert problems(_stage({"only": {**HEALTHY, "p95_ms": 250.0}}), None, PARAMS, DRIFT) == [
        "p95 latency 250.0 ms > 200 ms (no baseline) (1 of 1 device(s) over the limit)"]


def test_two_devices_count_half_each_whatever_they_claim():
    stage = _stage({"a": HEALTHY, "b": {**HEALTHY, "requests": 10**9, "errors": 0}})
    assert stage.requests == 200 and stage.error_rate == pytest.approx(0.005)  # (0.01 + 0.0) / 2


def test_a_regression_on_most_devices_shows_even_when_some_are_fine():
    before = {f"d{i}": HEALTHY for i in range(10)}
    after = {**before, **{f"d{i}": REGRESSED for i in range(6)}}
    assert len(_verdict(before, after)) == 3


@pytest.mark.parametrize("values, weights, expected", [
    ({}, {}, None),
    ({"a": 1.0}, {"a": 0.0}, 1.0),
    ({"a": 1.0, "b": 3.0}, {"a": 1.0, "b": 3.0}, 2.5),
    ({"a": 1.0, "b": 2.0, "c": 1e9}, {"a": 1.0, "b": 1.0, "c": 1.0}, 2.0),  # the extremes set aside
    ({f"d{i}": float(i) for i in range(20)}, {f"d{i}": 1.0 for i in range(20)}, 9.5),  # 2 set aside on each side
])
def test_robust_mean(values, weights, expected):
    assert robust_mean(values, weights) == (expected if expected is None else pytest.approx(expected))
