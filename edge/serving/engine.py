"""What answers a prediction: the active version, its fallback, the cascade and the shadow.

- **Fallback**: when the active version fails to load it is rolled back in the store and the
  previous one serves; when it fails to invoke, the previous version answers that request. With no
  working version, :class:`ModelUnavailable` (the server's 503).
- **Cascade**: rows the primary model is unsure of (confidence under the threshold) are answered by
  the version's large model, unless the device is thermally throttled.
- **Shadow**: a share of requests is also run by another installed version on a background thread,
  off the response path; agreement and latency are exported.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from edge.errors import EdgeError
from edge.serving.metrics import Metrics
from edge.serving.thermal import ThermalMonitor
from edge.store.health import LoadedVersion
from edge.store.model_store import ModelStore

log = logging.getLogger(__name__)
SHADOW_QUEUE = 8  # shadow requests waiting at most; more are dropped (and counted), never queued without bound


class ModelUnavailable(EdgeError):
    """No model version can answer (none installed, or every one fails)."""


@dataclass(frozen=True)
class Prediction:
    version: LoadedVersion
    scores: np.ndarray  # (N, classes) float32
    stages: list[str]  # per row: primary | large
    fallback: str | None  # why the previous version answered, else None
    latency_s: float

    @property
    def class_indices(self) -> np.ndarray:
        return self.scores.argmax(axis=1)

    @property
    def confidences(self) -> np.ndarray:
        return self.scores.max(axis=1)


class InferenceEngine:
    def __init__(self, store: ModelStore, metrics: Metrics, thermal: ThermalMonitor, num_threads: int | None = None,
                 cascade_threshold: float | None = None, shadow_version: str | None = None,
                 shadow_fraction: float = 0.0, seed: int | None = None) -> None:
        self.store, self.metrics, self.thermal = store, metrics, thermal
        self.num_threads, self.cascade_threshold = num_threads, cascade_threshold
        self.shadow_version, self.shadow_fraction = shadow_version, shadow_fraction
        self.active: LoadedVersion | None = None
        self._previous: LoadedVersion | None = None
        self._shadow: LoadedVersion | None = None
        self._invoke_lock = threading.Lock()  # one interpreter is not safe to call from two threads
        self._reload_lock = threading.Lock()
        self._random = random.Random(seed)
        self._shadow_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shadow")
        self._shadow_slots = threading.Semaphore(SHADOW_QUEUE)

    # ---- loading -----------------------------------------------------------------------------------

    def reload(self) -> str | None:
        """Load the store's active version if it is not the one serving; roll back when it fails to load."""
        with self._reload_lock:
            state = self.store.state()
            while state.active is not None and (self.active is None or self.active.version != state.active):
                try:
                    loaded = self.store.load(state.active, self.num_threads)
                except (EdgeError, OSError) as error:
                    reason = f"load failed: {error}"
                    log.error("active version %s %s", state.active, reason)
                    self.metrics.fallbacks.labels("load_failed").inc()
                    if state.previous is None:
                        break
                    self.store.rollback(reason)
                    state = self.store.state()
                    continue
                self.active = loaded
                self._publish_info(loaded)
                log.info("serving %s %s (%s)", loaded.manifest.model_name, loaded.version, loaded.manifest.variant)
            self._load_fallback(state.previous)
            self._load_shadow()
            return self.active.version if self.active else None

    def _load_fallback(self, previous: str | None) -> None:
        """Keep the store's previous version loaded (here, not on a failing request) to answer for the active."""
        if self._previous is not None and self._previous.version == previous:
            return
        self._previous = None
        if previous is not None and self.active is not None and previous != self.active.version:
            try:
                self._previous = self.store.load(previous, self.num_threads)
            except Exception as error:  # no fallback is worse than a fallback, not fatal
                log.error("fallback version %s unavailable: %s", previous, error)

    def _publish_info(self, loaded: LoadedVersion) -> None:
        manifest = loaded.manifest
        self.metrics.model_info.info({"version": manifest.version, "model_name": manifest.model_name,
                                      "mlflow_version": manifest.mlflow_version, "variant": manifest.variant,
                                      "runtime": manifest.primary.runtime, "data_version": manifest.data_version})

    def _load_shadow(self) -> None:
        wanted = self.shadow_version
        if wanted is None or (self._shadow is not None and self._shadow.version == wanted):
            return
        try:
            self._shadow = self.store.load(wanted, self.num_threads)
        except Exception as error:  # a shadow that cannot load costs nothing but its comparisons
            log.error("shadow version %s unavailable: %s", wanted, error)
            self._shadow = None

    def previous(self) -> LoadedVersion | None:
        """The version to fall back on: the store's previous one, loaded by :meth:`reload`."""
        return self._previous

    # ---- predicting --------------------------------------------------------------------------------

    def _invoke(self, version: LoadedVersion, batch: np.ndarray) -> np.ndarray:
        with self._invoke_lock:
            return version.primary.predict(batch)

    def predict(self, batch: np.ndarray) -> Prediction:
        """Scores for a validated float32 batch, with fallback and cascade applied."""
        active, fallback = self.active, None
        if active is None:
            self.metrics.unavailable.inc()
            raise ModelUnavailable("no verified model version is installed: install a signed bundle")
        started = time.perf_counter()
        try:
            scores = self._invoke(active, batch)
        except Exception as error:  # a runtime failing on a valid input: the model, not the request
            log.error("version %s failed to invoke (%s: %s); falling back", active.version, type(error).__name__,
                      error)
            self.metrics.fallbacks.labels("invoke_failed").inc()
            fallback, active = f"{active.version} failed: {type(error).__name__}", self.previous()
            if active is None:
                self.metrics.unavailable.inc()
                raise ModelUnavailable(f"the active version failed and there is no previous one ({error})") from error
            try:
                scores = self._invoke(active, batch)
            except Exception as second:
                self.metrics.unavailable.inc()
                raise ModelUnavailable(f"both the active and the previous version failed ({second})") from second
        stages = ["primary"] * len(batch)
        self.metrics.latency.labels(active.version, "primary").observe(time.perf_counter() - started)
        scores = self._cascade(active, batch, scores, stages)
        prediction = Prediction(active, scores, stages, fallback, time.perf_counter() - started)
        self._record(prediction)
        self._maybe_shadow(batch, prediction)
        return prediction

    def _cascade(self, version: LoadedVersion, batch: np.ndarray, scores: np.ndarray, stages: list[str]) -> np.ndarray:
        if self.cascade_threshold is None or version.large is None:
            return scores
        unsure = np.flatnonzero(scores.max(axis=1) < self.cascade_threshold)
        if unsure.size == 0:
            self.metrics.cascade.labels("primary").inc(len(batch))
            return scores
        if not self.thermal.allows_extra_work:
            self.metrics.cascade.labels("skipped_thermal").inc(unsure.size)
            return scores
        started = time.perf_counter()
        with self._invoke_lock:
            escalated = version.large.predict(batch[unsure])
        self.metrics.latency.labels(version.version, "large").observe(time.perf_counter() - started)
        scores = scores.copy()
        scores[unsure] = escalated
        for row in unsure:
            stages[row] = "large"
        self.metrics.cascade.labels("escalated").inc(unsure.size)
        self.metrics.cascade.labels("primary").inc(len(batch) - unsure.size)
        return scores

    def _record(self, prediction: Prediction) -> None:
        version, labels = prediction.version.version, prediction.version.manifest.labels
        for index, confidence in zip(prediction.class_indices, prediction.confidences):
            self.metrics.confidence.labels(version).observe(float(confidence))
            self.metrics.predictions.labels(version, labels[index] if index < len(labels) else str(index)).inc()

    # ---- shadow ------------------------------------------------------------------------------------

    def _maybe_shadow(self, batch: np.ndarray, prediction: Prediction) -> None:
        shadow = self._shadow
        if shadow is None or self._random.random() >= self.shadow_fraction:
            return
        if not self.thermal.allows_extra_work:
            self.metrics.shadow.labels(shadow.version, "skipped_thermal").inc()
            return
        if not self._shadow_slots.acquire(blocking=False):
            self.metrics.shadow.labels(shadow.version, "dropped").inc()
            return
        self._shadow_pool.submit(self._run_shadow, shadow, batch.copy(), prediction.class_indices)

    def _run_shadow(self, shadow: LoadedVersion, batch: np.ndarray, served: np.ndarray) -> None:
        try:
            started = time.perf_counter()
            labels = shadow.primary.predict(batch).argmax(axis=1)  # its own interpreter: no lock needed
            self.metrics.latency.labels(shadow.version, "shadow").observe(time.perf_counter() - started)
            agree = int(np.sum(labels == served))
            self.metrics.shadow.labels(shadow.version, "agree").inc(agree)
            self.metrics.shadow.labels(shadow.version, "disagree").inc(len(labels) - agree)
        except Exception as error:  # a failing shadow never affects serving
            log.warning("shadow version %s failed: %s", shadow.version, error)
            self.metrics.shadow.labels(shadow.version, "error").inc()
        finally:
            self._shadow_slots.release()

    def close(self) -> None:
        self._shadow_pool.shutdown(wait=False, cancel_futures=True)
