"""Measurements a device (or the host, standing in for one) makes of a loaded model.

``python -m edge.bench.measure MODEL`` loads and runs a model in a fresh process and prints its memory
footprint as JSON, so the figure is not polluted by whatever the caller had loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.runtime import EdgeModel, module_for


@dataclass(frozen=True)
class LatencyStats:
    p50_ms: float
    p95_ms: float
    mean_ms: float
    runs: int


def measure_latency(model: EdgeModel, sample: np.ndarray, warmup_runs: int, runs: int) -> LatencyStats:
    """Single-stream latency (batch of one), after ``warmup_runs`` untimed invocations."""
    batch = np.asarray(sample, np.float32)[np.newaxis]
    for _ in range(warmup_runs):
        model.predict(batch)
    timings = np.empty(runs)
    for index in range(runs):
        started = time.perf_counter()
        model.predict(batch)
        timings[index] = (time.perf_counter() - started) * 1000.0
    return LatencyStats(float(np.percentile(timings, 50)), float(np.percentile(timings, 95)),
                        float(timings.mean()), runs)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (Linux only)")


def peak_rss_bytes() -> int:
    """Peak resident set size of this process image (VmHWM).

    Not ``ru_maxrss``: Linux carries that across fork/exec, so a child of a big parent would report the
    parent's peak.
    """
    return _status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    return _status_kib("VmRSS") * 1024


def memory_footprint(path: Path) -> dict[str, int]:
    """Memory of a process that loads ``path`` and runs one inference.

    ``model_rss_bytes`` is what loading and running the model added once its runtime was imported;
    ``peak_rss_bytes`` is the whole process's peak (runtime included), what a device must have free.
    """
    __import__(module_for(path.suffix) or "ai_edge_litert.interpreter")
    before = current_rss_bytes()
    model = EdgeModel.load(path, num_threads=1)
    shape = [1 if d == -1 else d for d in model.input.shape]
    model.predict(np.zeros(shape, np.float32))
    after = current_rss_bytes()
    return {"model_rss_bytes": max(0, after - before), "peak_rss_bytes": max(peak_rss_bytes(), after)}


def memory_footprint_in_fresh_process(path: Path, timeout_s: float = 120.0) -> dict[str, int]:
    """:func:`memory_footprint` of ``path`` measured in a new Python process (``python -m edge.bench.measure``)."""
    completed = subprocess.run([sys.executable, "-m", "edge.bench.measure", str(path)], capture_output=True, text=True,
                               timeout=timeout_s, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(memory_footprint(Path(sys.argv[1]))))
