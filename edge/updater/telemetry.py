"""Telemetry summaries for the fleet, computed from the edge service's Prometheus ``/metrics``.

The updater runs beside ``edgeloop serve`` as a separate process, so it reads the same figures any
scraper sees (names from :mod:`edge.serving.metrics`) and reports what changed over its interval:

- ``requests``: answered requests (one ``edgeloop_inference_latency_seconds`` observation with
  ``stage="primary"`` each, any version) plus the errors;
- ``errors``: requests refused with a 4xx (``edgeloop_requests_rejected``) or answered 503
  (``edgeloop_unavailable``); ``error_rate`` = errors / requests (0.0 without requests);
- ``p50_ms`` / ``p95_ms``: from the latency histogram's bucket deltas, interpolated within the bucket
  as Prometheus' ``histogram_quantile`` does (null without requests);
- ``mean_confidence``: over the predictions of the interval (null without any);
- ``version``: the version the service reports serving (``edgeloop_model_info``).

Figures only, never inputs or predictions. A counter that went down means the service restarted:
the new values are then the interval's.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)
LATENCY = "edgeloop_inference_latency_seconds"
CONFIDENCE = "edgeloop_prediction_confidence"
ERROR_COUNTERS = ("edgeloop_requests_rejected_total", "edgeloop_unavailable_total")
MODEL_INFO = "edgeloop_model_info"
TelemetrySource = Callable[[], "dict[str, Any] | None"]  # figures of the interval; None: nothing to report


@dataclass
class Scrape:
    """The cumulative figures of one ``/metrics`` read."""

    at: float  # monotonic seconds
    served: float = 0.0
    errors: float = 0.0
    latency_buckets: dict[float, float] = field(default_factory=dict)  # upper bound (s) -> cumulative count
    confidence_sum: float = 0.0
    confidence_count: float = 0.0
    version: str | None = None


def parse_metrics(text: str, at: float) -> Scrape:
    """The figures the summary needs from a Prometheus text exposition."""
    scrape = Scrape(at)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            name, labels, value = sample.name, sample.labels, sample.value
            if name == f"{LATENCY}_bucket" and labels.get("stage") == "primary":
                bound = float(labels["le"])
                scrape.latency_buckets[bound] = scrape.latency_buckets.get(bound, 0.0) + value
            elif name == f"{LATENCY}_count" and labels.get("stage") == "primary":
                scrape.served += value
            elif name in ERROR_COUNTERS:
                scrape.errors += value
            elif name == f"{CONFIDENCE}_sum":
                scrape.confidence_sum += value
            elif name == f"{CONFIDENCE}_count":
                scrape.confidence_count += value
            elif name == MODEL_INFO and "version" in labels:
                scrape.version = labels["version"]
    return scrape


def bucket_quantile(quantile: float, buckets: dict[float, float]) -> float | None:
    """The ``quantile`` of a cumulative histogram (upper bound -> count), or None when it is empty."""
    bounds = sorted(buckets)
    total = buckets[bounds[-1]] if bounds else 0.0
    if total <= 0:
        return None
    rank, lower, below = quantile * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):  # past the last finite bucket: its bound is the best estimate
                return lower
            return lower + (bound - lower) * ((rank - below) / (count - below) if count > below else 1.0)
        lower, below = bound, count
    return lower


def summarize(before: Scrape, after: Scrape) -> dict[str, Any]:
    """The interval's figures from two scrapes (``after`` alone when the service restarted in between)."""
    restarted = after.served < before.served or after.errors < before.errors or \
        after.confidence_count < before.confidence_count
    base = Scrape(before.at) if restarted else before
    served, errors = after.served - base.served, after.errors - base.errors
    requests = served + errors
    buckets = {bound: count - base.latency_buckets.get(bound, 0.0) for bound, count in after.latency_buckets.items()}
    p50, p95 = bucket_quantile(0.5, buckets), bucket_quantile(0.95, buckets)
    predictions = after.confidence_count - base.confidence_count
    return {"version": after.version, "window_s": round(after.at - before.at, 3), "requests": int(requests),
            "errors": int(errors), "error_rate": errors / requests if requests else 0.0,
            "p50_ms": None if p50 is None else p50 * 1000.0, "p95_ms": None if p95 is None else p95 * 1000.0,
            "mean_confidence": (after.confidence_sum - base.confidence_sum) / predictions if predictions else None}


class ServiceMetrics:
    """A telemetry source reading ``<service_url>/metrics``: each call reports the change since the last one.

    The first call only takes the baseline and returns None; so does a call that cannot read the
    service (the next successful one then covers the whole gap).
    """

    def __init__(self, service_url: str, timeout_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.url = service_url.rstrip("/") + "/metrics"
        self.timeout_s, self.clock = timeout_s, clock
        self._last: Scrape | None = None
        self._failing = False

    def __call__(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(self.url, timeout=self.timeout_s)
            response.raise_for_status()
            scrape = parse_metrics(response.text, self.clock())
        except (httpx.HTTPError, ValueError) as error:
            if not self._failing:  # once per outage, not every interval
                log.warning("cannot read %s (%s); telemetry waits for the service", self.url, error)
            self._failing = True
            return None
        self._failing = False
        before, self._last = self._last, scrape
        return None if before is None else summarize(before, scrape)
