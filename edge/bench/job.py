"""What ``edge.bench`` measures: the job (model files, eval set, run counts, sensors) and its configurations.

A job arrives as flags or as a JSON file from a runner; both become one validated :class:`BenchJob`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = "edgeloop.bench/1"


class BenchError(Exception):
    """Bad benchmark input (missing file, bad option): one clear message, exit code 2."""


@dataclass(frozen=True)
class BenchConfig:
    """One runtime configuration to measure every model with."""

    name: str = "default"
    threads: int | None = None           # None: the runtime's default
    xnnpack: bool = True                  # LiteRT's XNNPACK delegate
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime, in order of preference


@dataclass(frozen=True)
class BenchJob:
    """What to measure: model files, an optional labelled eval set, the phases' run counts and sensors."""

    models: tuple[str, ...]
    eval_set: str | None = None
    eval_limit: int | None = None
    iterations: int = 200
    warmup: int = 20
    configs: tuple[BenchConfig, ...] = (BenchConfig(),)
    rates: tuple[float, ...] = ()
    rate_seconds: float = 2.0
    timeout_s: float = 600.0              # per model and configuration
    thermal_sensor: str = "/sys/class/thermal/thermal_zone0/temp"
    thermal_limit_c: float | None = None
    energy_counter: str | None = None     # cumulative microjoules; None: RAPL when readable
    power_sensor: str | None = None       # instantaneous microwatts (hwmon power*_input, INA219)
    emulated: bool = False
    device: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchJob:
        if not isinstance(raw, dict):
            raise BenchError(f"a job must be a JSON object, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BenchError(f"unknown job key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        values = dict(raw)
        try:
            values["models"] = tuple(str(m) for m in values.get("models") or ())
            values["configs"] = tuple(BenchConfig(**{**c, "providers": tuple(c.get("providers") or
                                                                             BenchConfig.providers)})
                                      for c in values.get("configs") or [{}])
            values["rates"] = tuple(float(r) for r in values.get("rates") or ())
            job = cls(**values)
        except (TypeError, ValueError) as error:
            raise BenchError(f"bad job: {error}") from None
        job.validate()
        return job

    def validate(self) -> None:
        if not self.models:
            raise BenchError("no model files given")
        if self.iterations < 1 or self.warmup < 0:
            raise BenchError(f"iterations must be >= 1 and warmup >= 0 (got {self.iterations}, {self.warmup})")
        if any(rate <= 0 for rate in self.rates) or self.rate_seconds <= 0:
            raise BenchError("rates and rate_seconds must be positive")
        if self.timeout_s <= 0:
            raise BenchError("timeout_s must be positive")
        names = [c.name for c in self.configs]
        if len(set(names)) != len(names):
            raise BenchError(f"configuration names must be unique, got {names}")
        for config in self.configs:
            if config.threads is not None and config.threads < 1:
                raise BenchError(f"configuration {config.name!r}: threads must be >= 1")
        if self.eval_set is not None and not Path(self.eval_set).is_file():
            raise BenchError(f"eval set {self.eval_set} not found")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
