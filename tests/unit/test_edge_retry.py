"""The device's one backoff schedule: full jitter below a cap that doubles per consecutive failure."""

from __future__ import annotations

import random

import pytest

from edge.retry import backoff_delay


@pytest.mark.parametrize("failures, cap", [(0, 1.0), (1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (5, 8.0), (10**6, 8.0)])
def test_delays_are_uniform_below_a_doubling_cap(failures, cap):
    rng = random.Random(7)
    delays = [backoff_delay(failures, 1.0, 8.0, rng) for _ in range(500)]
    assert 0.0 <= min(delays) < 0.1 * cap and 0.9 * cap < max(delays) <= cap
    assert len(set(delays)) == len(delays)  # jittered: no two devices retry in lockstep


def test_the_same_seed_gives_the_same_schedule():
    caps = [min(30.0, 0.5 * 2 ** (failures - 1)) for failures in range(1, 10)]
    schedule = [backoff_delay(failures, 0.5, 30.0, random.Random(3)) for failures in range(1, 10)]
    assert schedule == [random.Random(3).uniform(0.0, cap) for cap in caps]
