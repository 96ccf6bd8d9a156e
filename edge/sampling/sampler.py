"""Sampling for drift and retraining: which served rows a device keeps, private by default.

:class:`Sampler` keeps ``sample_rate`` of the rows a device serves plus every row under a confidence
floor, as derived features (:mod:`edge.features`) with confidence, class, latency, model version and
time, raw inputs only when the store has ``store_raw``. They go to a :class:`SampleStore`
(:mod:`edge.sampling.store`, importable from here too): bounded, append-only and crash-safe.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np

from edge.errors import SampleStoreError, SamplingError
from edge.features import feature_names_of, features
from edge.identity import DEVICE_ID_RULE, is_device_id
from edge.sampling.segments import SampleRows
from edge.sampling.store import SampleStore

__all__ = ["SampleStore", "Sampler"]
LOGGER = logging.getLogger(__name__)


@dataclass(frozen=True)
class Selection:
    """Rows of one served batch that the sampling rule picked (``keep``), with what :meth:`Sampler.keep` needs."""

    inputs: np.ndarray
    top: np.ndarray
    probabilities: np.ndarray
    keep: np.ndarray
    low_confidence: np.ndarray


class Sampler:
    """Decides which served rows to keep and appends them to a :class:`SampleStore`.

    A row is kept with probability ``sample_rate``, and always when its top probability is under
    ``confidence_floor`` (the rows retraining needs most). Features are computed for kept rows only, so a
    row that is not kept costs a max, a min and a counter update. Sampling never fails a request: a store
    error is counted in ``failed_writes``, logged once per change of state and kept in ``last_error``.
    Counters for scrapes: ``offered_rows``, ``kept_by_rate``, ``kept_low_confidence``,
    ``skipped_non_finite``, ``failed_writes``.
    """

    def __init__(self, store: SampleStore, device_id: str, sample_rate: float = 0.02,
                 confidence_floor: float = 0.85, seed: int | None = None) -> None:
        if not 0.0 <= sample_rate <= 1.0:
            raise SamplingError(f"sample_rate {sample_rate} must be within [0, 1] (0.02 keeps 2% of rows)")
        if not 0.0 <= confidence_floor <= 1.0:
            raise SamplingError(f"confidence_floor {confidence_floor} must be within [0, 1] (0 keeps none "
                                "for low confidence)")
        if not is_device_id(device_id):
            raise SamplingError(f"device_id {device_id!r} is not allowed: {DEVICE_ID_RULE}")
        self.store = store
        self.device_id = device_id
        self.sample_rate = sample_rate
        self.confidence_floor = confidence_floor
        self.offered_rows = 0
        self.kept_by_rate = 0
        self.kept_low_confidence = 0
        self.skipped_non_finite = 0
        self.failed_writes = 0
        self.last_error: str | None = None  # the most recent write failure, kept after recovery
        self._writes_failing = False
        self._random = random.Random(seed)
        self._rows_to_next_pick = self._gap()
        self._lock = threading.Lock()

    def offer(self, inputs: np.ndarray, probabilities: np.ndarray, latency_ms: float, model_version: str) -> int:
        """Keep the rows of one served batch that the sampling rule selects; returns how many were kept."""
        selection = self.select(inputs, probabilities)
        return 0 if selection is None else self.keep(selection, latency_ms, model_version)

    def select(self, inputs: np.ndarray, probabilities: np.ndarray) -> Selection | None:
        """The cheap half of :meth:`offer` (a few µs): which rows to keep, or None for none of them."""
        probabilities = np.asarray(probabilities)
        rows = len(probabilities)
        if probabilities.ndim != 2 or rows != len(inputs):
            raise SamplingError(f"probabilities of shape {probabilities.shape} do not match inputs of shape "
                                f"{np.shape(inputs)}: expected (N, classes) for N inputs")
        top = np.maximum.reduce(probabilities, axis=1)
        with self._lock:
            self.offered_rows += rows
            picked_by_rate = self._rate_picks(rows)
        if not picked_by_rate and not np.minimum.reduce(top) < self.confidence_floor:
            return None
        low_confidence = top < self.confidence_floor
        keep = low_confidence.copy()
        keep[picked_by_rate] = True
        return Selection(np.asarray(inputs), top, probabilities, keep, low_confidence)

    def keep(self, selection: Selection, latency_ms: float, model_version: str) -> int:
        """The costly half of :meth:`offer`: features of the selected rows, appended to the store."""
        return self._keep(selection.inputs, selection.top, selection.probabilities, selection.keep,
                          selection.low_confidence, latency_ms, model_version)

    def _rate_picks(self, rows: int) -> list[int]:
        """Positions among the next ``rows`` rows that the rate keeps.

        Geometric gaps between picks are the same as an independent draw per row, and a batch with no
        pick (almost all of them at 2%) costs one subtraction instead of a random draw per row.
        """
        picks = []
        position = self._rows_to_next_pick
        while position < rows:
            picks.append(position)
            position += 1 + self._gap()
        self._rows_to_next_pick = position - rows
        return picks

    def _gap(self) -> float:
        """Rows passed over before the next pick: geometric with success probability ``sample_rate``."""
        if self.sample_rate >= 1.0:
            return 0
        if self.sample_rate <= 0.0:
            return math.inf
        return math.floor(math.log(1.0 - self._random.random()) / math.log(1.0 - self.sample_rate))

    def _keep(self, inputs: np.ndarray, top: np.ndarray, probabilities: np.ndarray, keep: np.ndarray,
              low_confidence: np.ndarray, latency_ms: float, model_version: str) -> int:
        rows = np.flatnonzero(keep)
        kept_inputs = inputs[rows].astype(np.float32, copy=False)
        derived = features(kept_inputs)
        finite = np.logical_and.reduce(np.isfinite(derived), axis=1)
        skipped = len(rows) - int(np.count_nonzero(finite))
        if skipped:  # a NaN input would make the receiver refuse the whole file
            rows, kept_inputs, derived = rows[finite], kept_inputs[finite], derived[finite]
        reasons = tuple("low_confidence" if low_confidence[row] else "rate" for row in rows)
        kept = SampleRows(
            features=derived, feature_names=feature_names_of(inputs.shape[1:]),
            confidence=np.clip(top[rows], 0.0, 1.0).astype(np.float32),
            predicted=probabilities[rows].argmax(axis=1).astype(np.int32), reasons=reasons,
            sample_ids=tuple(uuid.uuid4().hex for _ in reasons), latency_ms=float(latency_ms),
            model_version=model_version, device_id=self.device_id, timestamp=time.time(),
            inputs=kept_inputs if self.store.store_raw else None)
        try:
            written = self.store.append(kept) if reasons else 0
        except (OSError, SampleStoreError) as error:
            with self._lock:
                self.failed_writes += 1
                if not self._writes_failing:
                    LOGGER.warning("sampling stopped writing: %s", error)
                self._writes_failing, self.last_error = True, str(error)
            return 0
        with self._lock:
            self.skipped_non_finite += skipped
            self.kept_low_confidence += reasons.count("low_confidence")
            self.kept_by_rate += reasons.count("rate")
            if self._writes_failing:
                LOGGER.info("sampling writes again (%d failed writes so far)", self.failed_writes)
                self._writes_failing = False
        return written
