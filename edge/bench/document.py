"""The benchmark document: one fresh child process per (model, configuration), then environment and settings.

Each child runs :func:`edge.bench.phases.measure_one` (``python -m edge.bench --child``), so its peak RSS is
its own and a crash, an out-of-memory kill or a hang becomes an error row instead of ending the benchmark.
The document is described by ``edge/bench/schema.json`` and written atomically.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from edge.bench.job import SCHEMA_VERSION, BenchConfig, BenchJob
from edge.bench.probes import describe_environment


def _child_command(model: str, config: BenchConfig, job_path: Path) -> list[str]:
    return [sys.executable, "-m", "edge.bench", "--child", model, "--child-config", config.name, "--job", str(job_path)]


def _failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory: the model does not fit the memory limit)" if -returncode == signal.SIGKILL else ""
        return f"the benchmark process was killed by {name}{hint}"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return last[-1][:500] if last else f"the benchmark process exited with code {returncode}"


def run_isolated(model: str, config: BenchConfig, job: BenchJob, job_path: Path) -> dict[str, Any]:
    """:func:`measure_one` in a fresh process; an error row when it fails, is killed or runs too long."""
    row: dict[str, Any] = {"model": Path(model).name, "config": asdict(config) | {"providers": list(config.providers)}}
    started = time.perf_counter()
    try:
        completed = subprocess.run(_child_command(model, config, job_path), capture_output=True, text=True,
                                   timeout=job.timeout_s)
    except subprocess.TimeoutExpired:
        return row | {"status": "error", "error": f"timed out after {job.timeout_s:.0f} s"}
    finally:
        row["wall_s"] = time.perf_counter() - started
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        return row | {"status": "error", "error": _failure(completed.returncode, completed.stderr)}
    return row | {"status": "ok", "error": None, **json.loads(lines[-1])}


def applies(config: BenchConfig, model: str) -> bool:
    """Whether ``config`` means anything for ``model``'s runtime: XNNPACK switches are LiteRT's, execution
    providers ONNX Runtime's; the first configuration always runs."""
    if Path(model).suffix == ".onnx":
        return config.xnnpack
    return tuple(config.providers) == BenchConfig.providers


def run_job(job: BenchJob) -> dict[str, Any]:
    """The whole document: environment, settings and one result row per (model, configuration)."""
    job.validate()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as scratch:
        job_path = Path(scratch) / "job.json"
        job_path.write_text(json.dumps(job.to_dict()))
        results = [run_isolated(model, config, job, job_path) for model in job.models
                   for index, config in enumerate(job.configs) if index == 0 or applies(config, model)]
    return {"schema": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": describe_environment(job.emulated, job.device),
            "settings": {k: v for k, v in job.to_dict().items() if k != "models"},
            "results": results}


def write_json(document: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, out)  # readers never see half a file
