"""Is a rollout stage healthy? Each device's telemetry on the new version against its own before, then the fleet.

Devices publish summaries (``edge/updater/daemon.py``, validated by :mod:`tasks.rollout.messages`): requests,
errors, p50/p95 latency and mean confidence over an interval. A stage's figures use every summary its
devices sent about the version since the stage's acknowledgements; the baseline is the same devices'
figures on the previous version from the ``rollout.baseline_window_s`` before the stage started.

**Per device first.** Each device's summaries pool into its own figures (:class:`DeviceFigures`): error
rate = its errors / its requests, p95 and mean confidence as request-weighted means of its summaries
(a percentile cannot be rebuilt from percentiles; the weighted mean moves with a slowdown).

**Then across devices, so no single device decides.** A device's weight is its request count capped at
the stage's typical count (the lower median over the devices that served requests): a device claiming a
billion requests weighs as much as a typical one, never more. With three or more devices, the most
extreme devices on each side (10%, at least one) are set aside and the rest are averaged by weight (a
trimmed mean); with one or two devices all of them count.

The limits keep their meaning, checked per device and then aggregated the same way: for each device its
margin over a limit (its error rate above its previous version's plus ``max_error_rate_increase``; its p95
above both ``max_p95_ratio`` x and ``min_p95_increase_ms`` more than its previous version's; its mean
confidence below its previous version's minus ``max_confidence_drop``), compared with its own baseline, or
the stage's when it has none; the stage has the problem when the trimmed weighted mean of the margins is
above zero. Without any baseline (new devices, no traffic before) the guide's absolute limits apply:
mean confidence at least ``drift.min_mean_confidence``, p95 at most ``drift.max_latency_p95_ms``, error
rate at most ``max_error_rate_increase``.

So, in a stage where three or more devices report: one device cannot hide a problem every other device
shows, nor make one that no other device shows (its margins are set aside or lie between the others');
with two, each counts half; with one, it decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from tasks.config import DriftParams, RolloutParams

TRIM_FRACTION = 0.1  # of the devices, set aside on each side of a figure (at least one from three devices up)


@dataclass(frozen=True)
class DeviceFigures:
    """One device's figures over a window, as it reported them."""

    requests: int
    errors: int
    error_rate: float | None = None
    p95_ms: float | None = None
    mean_confidence: float | None = None


@dataclass(frozen=True)
class Figures:
    """A stage's figures: robust aggregates across devices, and each device's own (``by_device``).

    ``requests`` counts each device's requests capped at the stage's typical count.
    """

    devices: int
    requests: int
    error_rate: float | None = None
    p95_ms: float | None = None
    mean_confidence: float | None = None
    by_device: dict[str, DeviceFigures] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def weights(self) -> dict[str, float]:
        """Each device's weight: its requests, capped at the lower median of the devices that served any."""
        served = sorted(figures.requests for figures in self.by_device.values() if figures.requests > 0)
        cap = served[(len(served) - 1) // 2] if served else 0
        return {device: float(min(figures.requests, cap)) for device, figures in self.by_device.items()}

    def reporting(self) -> int:
        """Devices that reported requests."""
        return sum(figures.requests > 0 for figures in self.by_device.values())

    def devices_or_whole(self) -> dict[str, DeviceFigures]:
        """``by_device``, or the aggregate as one device when the figures carry none (built by hand)."""
        return self.by_device or {"stage": DeviceFigures(self.requests, 0, self.error_rate, self.p95_ms,
                                                         self.mean_confidence)}


def _weighted(summaries: list[dict[str, Any]], key: str) -> float | None:
    pairs = [(float(s[key]), int(s.get("requests") or 0)) for s in summaries if s.get(key) is not None]
    weight = sum(requests for _, requests in pairs)
    if not pairs:
        return None
    if weight == 0:
        return sum(value for value, _ in pairs) / len(pairs)
    return sum(value * requests for value, requests in pairs) / weight


def robust_mean(values: dict[str, float], weights: dict[str, float]) -> float | None:
    """The trimmed weighted mean of per-device ``values``: with three or more, the ``TRIM_FRACTION`` most extreme
    on each side (at least one) set aside; unweighted when the rest carry no weight. None without values."""
    ordered = sorted(values.items(), key=lambda item: (item[1], item[0]))
    trim = min(max(1, int(len(ordered) * TRIM_FRACTION)), (len(ordered) - 1) // 2) if len(ordered) >= 3 else 0
    kept = ordered[trim:len(ordered) - trim]
    if not kept:
        return None
    total = sum(weights.get(device, 0.0) for device, _ in kept)
    if total <= 0:
        return sum(value for _, value in kept) / len(kept)
    return sum(value * weights.get(device, 0.0) for device, value in kept) / total


def device_figures(summaries: list[dict[str, Any]]) -> dict[str, DeviceFigures]:
    """Each device's own figures from its summaries (every summary counts its own requests)."""
    by_device: dict[str, list[dict[str, Any]]] = {}
    for summary in summaries:
        by_device.setdefault(str(summary.get("device")), []).append(summary)
    figures = {}
    for device, own in sorted(by_device.items()):
        requests = sum(int(s.get("requests") or 0) for s in own)
        errors = sum(int(s.get("errors") or 0) for s in own)
        figures[device] = DeviceFigures(requests, errors, errors / requests if requests else None,
                                        _weighted(own, "p95_ms"), _weighted(own, "mean_confidence"))
    return figures


def pool(summaries: list[dict[str, Any]]) -> Figures:
    """One stage's figures: per device first, then robust aggregates across devices (module docstring)."""
    by_device = device_figures(summaries)
    stage = Figures(len(by_device), 0, by_device=by_device)
    weights = stage.weights()

    def across(read: Callable[[DeviceFigures], float | None]) -> float | None:
        return robust_mean({d: v for d, f in by_device.items() if (v := read(f)) is not None}, weights)

    return Figures(len(by_device), int(sum(weights.values())), across(lambda f: f.error_rate),
                   across(lambda f: f.p95_ms), across(lambda f: f.mean_confidence), by_device)


def _over(current: Figures, margins: dict[str, float]) -> str | None:
    """None when the robust mean of the devices' margins is at most zero; else who is over, for the message."""
    aggregate = robust_mean(margins, current.weights())
    if aggregate is None or aggregate <= 0:
        return None
    return f" ({sum(value > 0 for value in margins.values())} of {len(margins)} device(s) over the limit)"


def _margins(current: Figures, baseline: Figures | None, name: str,
             margin: Callable[[float, float | None], float]) -> dict[str, float]:
    """Each device's ``margin(value, reference)`` for figure ``name``: its own baseline's value as the reference,
    else the stage baseline's (None without any)."""
    own = baseline.by_device if baseline is not None else {}
    stage = getattr(baseline, name) if baseline is not None else None
    margins = {}
    for device, figures in current.devices_or_whole().items():
        value = getattr(figures, name)
        reference = getattr(own[device], name) if device in own else None
        if value is not None:
            margins[device] = margin(value, reference if reference is not None else stage)
    return margins


def problems(current: Figures, baseline: Figures | None, params: RolloutParams, drift: DriftParams) -> list[str]:
    """Why the stage is unhealthy (empty: healthy); each problem names the figure, its limit and the baseline."""
    found: list[str] = []
    if current.requests == 0:
        return found  # no traffic, no evidence: acknowledgements decide
    base = baseline if baseline is not None and baseline.requests > 0 else None
    if current.error_rate is not None:
        base_rate = base.error_rate if base is not None and base.error_rate is not None else 0.0
        margins = _margins(current, base, "error_rate", lambda value, reference: value - (
            base_rate if reference is None else reference) - params.max_error_rate_increase)
        if who := _over(current, margins):
            found.append(f"error rate {current.error_rate:.3f} > {base_rate:.3f} (previous version) + "
                         f"{params.max_error_rate_increase:g}{who}")
    if current.p95_ms is not None:
        if base is not None and base.p95_ms:
            margins = _margins(current, base, "p95_ms", lambda value, reference: min(
                value - params.max_p95_ratio * reference, value - reference - params.min_p95_increase_ms))
            if who := _over(current, margins):
                found.append(f"p95 latency {current.p95_ms:.1f} ms > {params.max_p95_ratio:g} x {base.p95_ms:.1f} "
                             f"ms (previous version) and {params.min_p95_increase_ms:g} ms more{who}")
        elif who := _over(current, _margins(current, None, "p95_ms",
                                            lambda value, _: value - drift.max_latency_p95_ms)):
            found.append(f"p95 latency {current.p95_ms:.1f} ms > {drift.max_latency_p95_ms:g} ms (no baseline){who}")
    if current.mean_confidence is not None:
        if base is not None and base.mean_confidence is not None:
            margins = _margins(current, base, "mean_confidence",
                               lambda value, reference: reference - params.max_confidence_drop - value)
            if who := _over(current, margins):
                found.append(f"mean confidence {current.mean_confidence:.3f} < {base.mean_confidence:.3f} "
                             f"(previous version) - {params.max_confidence_drop:g}{who}")
        elif who := _over(current, _margins(current, None, "mean_confidence",
                                            lambda value, _: drift.min_mean_confidence - value)):
            found.append(f"mean confidence {current.mean_confidence:.3f} < {drift.min_mean_confidence:g} "
                         f"(no baseline){who}")
    return found
