"""Full-jitter exponential backoff, the one retry schedule of the device (sample uploads, bundle fetches, MQTT).

After an outage a whole fleet retries at once; drawing each delay uniformly below a cap that doubles per
consecutive failure spreads them out (the "full jitter" of AWS's backoff study) while still backing off.
"""

from __future__ import annotations

import random

MAX_DOUBLINGS = 60  # days of outage must not overflow a float


def backoff_delay(failures: int, initial_s: float, max_s: float, rng: random.Random) -> float:
    """Seconds to wait after ``failures`` consecutive failures: uniform in ``[0, cap]``.

    Args:
        failures: consecutive failures so far (1 after the first; 0 or less is treated as 1).
        initial_s: the cap after the first failure.
        max_s: the cap never grows past this.
        rng: the source of jitter (seed it for a reproducible schedule).

    Returns:
        A delay drawn uniformly below ``min(max_s, initial_s * 2 ** (failures - 1))``.
    """
    cap = min(max_s, initial_s * 2 ** min(max(failures - 1, 0), MAX_DOUBLINGS))
    return rng.uniform(0.0, cap)
