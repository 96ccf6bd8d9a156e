"""Is a rollout stage healthy? The cohort's telemetry on the new version against the same devices' before.

Devices publish summaries (``edge/updater.py``): requests, errors, p50/p95 latency and mean confidence
over an interval. A stage's figures pool every summary its devices sent about the version since the stage's
acknowledgements (the baseline: within ``rollout.baseline_window_s`` before it), so a few requests of one
interval do not decide alone: error rate
and mean confidence weighted by requests, p95 as the request-weighted mean of the devices' p95s (a
fleet-wide percentile cannot be rebuilt from per-device percentiles; the weighted mean moves with a
slowdown on any share of the devices). The baseline is the same devices' figures on the previous
version, from the telemetry received in the ``rollout.baseline_window_s`` before the stage started.
Without a baseline (new devices, no traffic) the guide's absolute limits apply: mean confidence at
least ``drift.min_mean_confidence`` and p95 at most ``drift.max_latency_p95_ms``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tasks.config import DriftParams, RolloutParams


@dataclass(frozen=True)
class Figures:
    devices: int
    requests: int
    error_rate: float | None = None
    p95_ms: float | None = None
    mean_confidence: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _weighted(summaries: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(float(s[key]), int(s.get("requests") or 0)) for s in summaries if s.get(key) is not None]
    weight = sum(requests for _, requests in pairs)
    if not pairs:
        return None
    if weight == 0:
        return sum(value for value, _ in pairs) / len(pairs)
    return sum(value * requests for value, requests in pairs) / weight


def pool(summaries: list[dict[str, Any]]) -> Figures:
    """One stage's figures pooled from its devices' telemetry summaries (every summary counts its own requests)."""
    requests = sum(int(s.get("requests") or 0) for s in summaries)
    errors = sum(int(s.get("errors") or 0) for s in summaries)
    return Figures(len({s.get("device") for s in summaries}), requests,
                   errors / requests if requests else None, _weighted(summaries, "p95_ms"),
                   _weighted(summaries, "mean_confidence"))


def problems(current: Figures, baseline: Figures | None, params: RolloutParams, drift: DriftParams) -> list[str]:
    """Why the stage is unhealthy (empty: healthy); each problem names the figure, its limit and the baseline."""
    found: list[str] = []
    if current.requests == 0:
        return found  # no traffic, no evidence: acknowledgements decide
    has_base = baseline is not None and baseline.requests > 0
    if current.error_rate is not None:
        base_rate = baseline.error_rate if has_base and baseline.error_rate is not None else 0.0
        if current.error_rate > base_rate + params.max_error_rate_increase:
            found.append(f"error rate {current.error_rate:.3f} > {base_rate:.3f} (previous version) + "
                         f"{params.max_error_rate_increase:g}")
    if current.p95_ms is not None:
        if has_base and baseline.p95_ms:
            if current.p95_ms > baseline.p95_ms * params.max_p95_ratio and \
                    current.p95_ms - baseline.p95_ms > params.min_p95_increase_ms:
                found.append(f"p95 latency {current.p95_ms:.1f} ms > {params.max_p95_ratio:g} x "
                             f"{baseline.p95_ms:.1f} ms (previous version) and {params.min_p95_increase_ms:g} ms more")
        elif current.p95_ms > drift.max_latency_p95_ms:
            found.append(f"p95 latency {current.p95_ms:.1f} ms > {drift.max_latency_p95_ms:g} ms (no baseline)")
    if current.mean_confidence is not None:
        if has_base and baseline.mean_confidence is not None:
            if current.mean_confidence < baseline.mean_confidence - params.max_confidence_drop:
                found.append(f"mean confidence {current.mean_confidence:.3f} < {baseline.mean_confidence:.3f} "
                             f"(previous version) - {params.max_confidence_drop:g}")
        elif current.mean_confidence < drift.min_mean_confidence:
            found.append(f"mean confidence {current.mean_confidence:.3f} < {drift.min_mean_confidence:g} "
                         "(no baseline)")
    return found
