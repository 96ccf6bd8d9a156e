"""Thermal awareness: read the SoC temperature from sysfs and say how much work the device may do.

``normal``: everything runs. ``soft`` (over the device's limit minus ``soft_margin_c``): the cascade's
second stage and shadow traffic stop. ``hard`` (over the limit minus ``hard_margin_c``): sample
uploads pause too. Predictions themselves always run. A missing or unreadable sensor reads as
unknown (``None``) and counts as ``normal``: the reason is logged once, not per request.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)
DEFAULT_SENSOR = Path("/sys/class/thermal/thermal_zone0/temp")
STATES = ("normal", "soft", "hard")


def read_celsius(sensor: Path) -> tuple[float | None, str | None]:
    """The sensor's temperature in °C (sysfs gives millidegrees), or None and why it could not be read."""
    try:
        value = float(Path(sensor).read_text().strip())
    except (OSError, ValueError) as error:
        return None, f"{sensor}: {error}"
    return (value / 1000.0 if abs(value) >= 1000 else value), None


class ThermalMonitor:
    """Cached temperature reads (at most one per ``interval_s``) and the state they put the device in."""

    def __init__(self, sensor: Path = DEFAULT_SENSOR, limit_c: float = 85.0, soft_margin_c: float = 10.0,
                 hard_margin_c: float = 2.0, interval_s: float = 1.0) -> None:
        self.sensor, self.limit_c, self.interval_s = Path(sensor), limit_c, interval_s
        self.soft_c, self.hard_c = limit_c - soft_margin_c, limit_c - hard_margin_c
        self.temperature_c: float | None = None
        self.state = "normal"
        self._read_at = float("-inf")
        self._sensor_problem: str | None = None

    def _read(self) -> float | None:
        value, problem = read_celsius(self.sensor)
        if problem is not None and problem != self._sensor_problem:
            log.warning("thermal sensor unreadable (%s); thermal limits are not enforced", problem)
        self._sensor_problem = problem
        return value

    def refresh(self, now: float | None = None) -> str:
        """Re-read the sensor when the cache is stale; return the state (logged when it changes)."""
        now = time.monotonic() if now is None else now
        if now - self._read_at >= self.interval_s:
            self._read_at = now
            self.temperature_c = self._read()
            temperature = self.temperature_c
            state = ("normal" if temperature is None or temperature < self.soft_c
                     else "soft" if temperature < self.hard_c else "hard")
            if state != self.state:
                log.warning("thermal state %s -> %s at %s C (soft %.1f C, hard %.1f C)", self.state, state,
                            temperature, self.soft_c, self.hard_c)
                self.state = state
        return self.state

    @property
    def allows_extra_work(self) -> bool:
        """Cascade second stage and shadow traffic: only below the soft limit."""
        return self.refresh() == "normal"

    @property
    def allows_uploads(self) -> bool:
        """Sample uploads: paused over the hard limit."""
        return self.refresh() != "hard"
