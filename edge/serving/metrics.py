"""Prometheus metrics of the edge service, in a registry of its own (one per server instance).

Counters and histograms are updated on the request path; figures owned by other objects (sample
store bytes, upload backlog, temperature) are read from them at scrape time, so nothing is copied.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.99, 1.0)


class Metrics:
    """Every metric the service exports (``edgeloop_*``)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        self.latency = Histogram("edgeloop_inference_latency_seconds", "model invocation time per request",
                                 ["version", "stage"], buckets=LATENCY_BUCKETS_S, registry=registry)
        self.confidence = Histogram("edgeloop_prediction_confidence", "top-class probability of each prediction",
                                    ["version"], buckets=CONFIDENCE_BUCKETS, registry=registry)
        self.predictions = Counter("edgeloop_predictions", "predictions served, by predicted class",
                                   ["version", "label"], registry=registry)
        self.rejected = Counter("edgeloop_requests_rejected", "requests refused with a 4xx, by reason",
                                ["reason"], registry=registry)
        self.fallbacks = Counter("edgeloop_fallbacks", "requests served by the previous version, by reason",
                                 ["reason"], registry=registry)
        self.unavailable = Counter("edgeloop_unavailable", "requests answered 503: no model works", registry=registry)
        self.cascade = Counter("edgeloop_cascade", "cascade decisions: primary, escalated, skipped_thermal",
                               ["outcome"], registry=registry)
        self.shadow = Counter("edgeloop_shadow", "shadow comparisons: agree, disagree, dropped, skipped_thermal, "
                                                 "error", ["version", "outcome"], registry=registry)
        self.store_events = Counter("edgeloop_store_events", "model store events this server saw (installed, "
                                                             "refused, activated, rolled_back, pruned)", ["event"],
                                    registry=registry)
        self.model_info = Info("edgeloop_model", "the active model version", registry=registry)

    def gauge(self, name: str, documentation: str, read: Callable[[], float | None]) -> None:
        """A gauge whose value is ``read()`` at scrape time (NaN while unknown)."""

        def value() -> float:
            result = read()
            return float("nan") if result is None else float(result)

        Gauge(name, documentation, registry=self.registry).set_function(value)

    def counters(self, name: str, documentation: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        """A counter family whose values (by ``label``) another object keeps, read at scrape time."""
        self.registry.register(_CountsCollector(name, documentation, label, read))

    def store_event(self, event: str, version: str, reason: str) -> None:
        """The model store's event hook (refusals by reason are counted by the store itself: any process)."""
        self.store_events.labels(event).inc()


class _CountsCollector(Collector):
    def __init__(self, name: str, documentation: str, label: str, read: Callable[[], dict[str, int]]) -> None:
        self._name, self._documentation, self._label, self._read = name, documentation, label, read

    def collect(self):
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        try:
            counts = self._read()
        except Exception:  # a scrape must not fail because the store is unreadable right now
            counts = {}
        for value, count in sorted(counts.items()):
            family.add_metric([value], count)
        yield family
