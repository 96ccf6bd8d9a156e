"""Sampling off the response path: selections queue to a worker thread, bounded, drained on stop."""

from __future__ import annotations

import threading

import numpy as np

from edge.sampling.sampler import Sampler, SampleStore
from edge.sampling.worker import SamplingWorker


def unsure(rows: int) -> np.ndarray:
    return np.full((rows, 10), 0.1, np.float32)  # every row under the confidence floor: all selected


def test_the_worker_keeps_what_was_selected_and_drains_on_stop(tmp_path, rng):
    store = SampleStore(tmp_path, records_per_file=1000)
    worker = SamplingWorker(Sampler(store, "dev-1", sample_rate=0.0))
    worker.start()
    for _ in range(20):
        worker.offer(rng.random((3, 8, 8, 1), dtype=np.float32), unsure(3), 1.0, "v1")
    worker.offer(rng.random((2, 8, 8, 1), dtype=np.float32), np.eye(10, dtype=np.float32)[:2], 1.0, "v1")  # sure
    worker.stop()
    assert worker.sampler.kept_low_confidence == 60 and store.records_written == 60 and worker.dropped == 0


def test_a_full_queue_drops_and_counts_instead_of_blocking(tmp_path, rng):
    sampler = Sampler(SampleStore(tmp_path), "dev-1", sample_rate=0.0)
    release = threading.Event()
    original_keep = sampler.keep
    sampler.keep = lambda *args: (release.wait(10), original_keep(*args))[1]  # a worker stuck on a slow disk
    worker = SamplingWorker(sampler, max_pending=4)
    worker.start()
    for _ in range(10):
        worker.offer(rng.random((1, 8, 8, 1), dtype=np.float32), unsure(1), 1.0, "v1")  # returns at once
    assert 5 <= worker.dropped <= 6  # one in the worker's hands, four queued, the rest dropped
    release.set()
    worker.stop()
    assert sampler.kept_low_confidence == 10 - worker.dropped
