"""What is sent to a device: the candidate files with their sidecars, an eval set and the ``edge.bench`` job.

Everything goes into one folder (``job.json`` names files relative to it), so every runner ships the
same thing: the local runner runs in it, the ssh runner copies it, the docker runner puts it into the
container, the prefect runner serves it over HTTP.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.sidecar import sidecar_path
from tasks.config import BenchmarkParams
from tasks.devices import DeviceSpec

JOB_FILE = "job.json"
EVAL_FILE = "eval.npz"
RESULT_FILE = "result.json"


@dataclass(frozen=True)
class Candidate:
    variant: str
    path: Path  # the model file; its sidecar (if any) travels with it and is verified on the device


def stage_inputs(candidates: list[Candidate], eval_x: np.ndarray, eval_y: np.ndarray, device: DeviceSpec,
                 params: BenchmarkParams, destination: Path, timeout_s: float) -> Path:
    """Fill ``destination`` with the files and ``job.json`` for ``device``; returns ``destination``."""
    destination.mkdir(parents=True, exist_ok=True)
    for candidate in candidates:
        shutil.copy(candidate.path, destination / candidate.path.name)
        if sidecar_path(candidate.path).is_file():
            shutil.copy(sidecar_path(candidate.path), destination / sidecar_path(candidate.path).name)
    np.savez(destination / EVAL_FILE, x=eval_x.astype(np.float32), y=eval_y)
    job = {"models": [c.path.name for c in candidates], "eval_set": EVAL_FILE, "iterations": params.iterations,
           "warmup": params.warmup, "configs": device.benchmark_configs(), "rates": list(params.rates),
           "rate_seconds": params.rate_seconds, "timeout_s": timeout_s, "thermal_limit_c": device.thermal_limit_c,
           "device": device.name}
    (destination / JOB_FILE).write_text(json.dumps(job, indent=2))
    return destination
