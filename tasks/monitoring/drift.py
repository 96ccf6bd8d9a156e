"""Summaries of the data devices sample and upload, and the retraining trigger rule.

Devices upload ``.npz`` files to ``drift.collected_dir`` with ``x`` (inputs) and, when they have
them, ``confidence`` (top-class probability per sample) and ``latency_ms``. Sample files from
``edge.samples`` (sent through ``edgeloop ingest``) carry derived ``features`` and no ``x`` unless the
device stores raw inputs; they count by their rows all the same. The guide's rule queues
retraining when mean confidence falls below 85% or latency p95 exceeds 200 ms (both in params).
Distribution-drift statistics (Evidently) extend this summary in the drift stage.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import DriftParams
from tasks.errors import DataError


@dataclass
class DriftSummary:
    collected_dir: str
    files: int
    samples: int
    mean_confidence: float | None = None
    latency_p95_ms: float | None = None
    drift_detected: bool = False
    reasons: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


SAMPLE_COUNT_KEYS = ("x", "features", "confidence")  # a file's sample count: the first of these it has


def load_collected(directory: Path) -> tuple[int, int, dict[str, np.ndarray]]:
    """Files, samples, and every upload's arrays concatenated; a corrupt upload is named, not skipped."""
    files = sorted(directory.glob("*.npz")) if directory.is_dir() else []
    arrays: dict[str, list[np.ndarray]] = {"x": [], "confidence": [], "latency_ms": []}
    samples = 0
    for path in files:
        try:
            with np.load(path, allow_pickle=False) as archive:
                for key in arrays:
                    if key in archive.files:
                        arrays[key].append(np.asarray(archive[key]))
                samples += next((len(archive[key]) for key in SAMPLE_COUNT_KEYS if key in archive.files), 0)
        except (OSError, ValueError) as error:
            raise DataError(f"collected file {path} is unreadable ({error}); move it aside and re-run") from error
    return len(files), samples, {k: np.concatenate(v) for k, v in arrays.items() if v}


def summarise(params: DriftParams) -> DriftSummary:
    """Load what devices collected and apply the retraining rule."""
    directory = Path(params.collected_dir)
    files, samples, arrays = load_collected(directory)
    summary = DriftSummary(str(directory), files, samples)
    if "confidence" in arrays:
        summary.mean_confidence = float(np.mean(arrays["confidence"]))
    if "latency_ms" in arrays:
        summary.latency_p95_ms = float(np.percentile(arrays["latency_ms"], 95))
    if samples < params.min_samples:
        summary.reasons.append(f"only {samples} samples (< {params.min_samples}): no verdict")
        return summary
    if summary.mean_confidence is not None and summary.mean_confidence < params.min_mean_confidence:
        summary.reasons.append(f"mean confidence {summary.mean_confidence:.3f} < {params.min_mean_confidence}")
    if summary.latency_p95_ms is not None and summary.latency_p95_ms > params.max_latency_p95_ms:
        summary.reasons.append(f"latency p95 {summary.latency_p95_ms:.1f} ms > {params.max_latency_p95_ms} ms")
    summary.drift_detected = bool(summary.reasons)
    return summary
