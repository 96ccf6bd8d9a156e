"""Sampling off the response path: the request thread only selects rows, a worker thread keeps them.

Selecting is a few microseconds; keeping costs the features, a disk append and, once per file, an
``.npz`` close (milliseconds). On a drifting device every prediction may fall under the confidence
floor, which is exactly when predictions must stay fast. The queue is bounded: when the worker falls
behind, new selections are dropped and counted (``dropped``), never queued without limit.
"""

from __future__ import annotations

import logging
import queue
import threading

import numpy as np

from edge.sampling.sampler import Sampler

LOGGER = logging.getLogger(__name__)
_STOP = object()


class SamplingWorker:
    def __init__(self, sampler: Sampler, max_pending: int = 256) -> None:
        self.sampler = sampler
        self.dropped = 0  # selections not kept because the queue was full
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None

    def offer(self, inputs: np.ndarray, probabilities: np.ndarray, latency_ms: float, model_version: str) -> None:
        """Select rows now; keep them on the worker thread. Never blocks, never raises for a full queue."""
        selection = self.sampler.select(inputs, probabilities)
        if selection is None:
            return
        try:
            self._queue.put_nowait((selection, latency_ms, model_version))
        except queue.Full:
            self.dropped += 1

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sampling", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Keep what is queued, then stop."""
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while (item := self._queue.get()) is not _STOP:
            selection, latency_ms, model_version = item
            try:
                self.sampler.keep(selection, latency_ms, model_version)
            except Exception:  # the worker must outlive one bad batch; the sampler counts store errors itself
                LOGGER.exception("sampling a batch failed")
