"""The ``device-benchmark`` flow: runs on a device's own Prefect worker (work pool ``edge-<device>``).

The control plane (:mod:`tasks.benchmark.prefect_runner`) deploys it and starts it with
``run_deployment``; the flow downloads the candidate files from the URLs it is given (sha256
checked), runs ``python -m edge.bench`` there and uploads the result document. It imports only Prefect,
the standard library and ``edge`` (which it runs as a subprocess), so a device needs the edge runtime,
Prefect and this repository's ``edge/`` and ``edge/bench/prefect_flow.py``: see the README, "Benchmarking
on devices".
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

DOWNLOAD_TIMEOUT_S = 120


def _fetch(url: str, sha256: str, target: Path) -> None:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310 (the control plane's URL)
        content = response.read()
    if hashlib.sha256(content).hexdigest() != sha256:
        raise ValueError(f"{target.name}: downloaded bytes do not match the sha256 the control plane sent")
    target.write_bytes(content)


def _summary(document: dict) -> str:
    lines = ["| model | config | status | p50 ms | p95 ms | accuracy | error |", "|---|---|---|---|---|---|---|"]
    for row in document.get("results", []):
        latency = row.get("latency") or {}
        p50, p95 = latency.get("p50_ms"), latency.get("p95_ms")
        lines.append(f"| {row['model']} | {row['config']['name']} | {row['status']} | "
                     f"{'' if p50 is None else f'{p50:.3f}'} | {'' if p95 is None else f'{p95:.3f}'} | "
                     f"{row.get('accuracy') if row.get('accuracy') is not None else ''} | {row.get('error') or ''} |")
    environment = document.get("environment", {})
    return (f"### On-device benchmark: {environment.get('device')} ({environment.get('arch')}, "
            f"{environment.get('cpu_model')})\n\n" + "\n".join(lines))


@flow(name="device-benchmark", log_prints=True)
def device_benchmark(device: str, files: dict[str, dict[str, str]], result_url: str, timeout_s: float = 900.0) -> dict:
    """Fetch the files, run ``edge.bench`` on this device, upload the result; returns counts.

    Args:
        device: the devices.yaml name this worker stands for (recorded in the result).
        files: file name -> {"url": ..., "sha256": ...}; one of them is job.json.
        result_url: where to PUT the result document.
        timeout_s: for edge.bench as a whole.
    """
    logger = get_run_logger()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as scratch:
        folder = Path(scratch)
        for name, spec in files.items():
            _fetch(spec["url"], spec["sha256"], folder / Path(name).name)
        env = {**os.environ, "PYTHONPATH": os.getcwd(), "PYTHONDONTWRITEBYTECODE": "1"}
        completed = subprocess.run([sys.executable, "-m", "edge.bench", "--job", "job.json", "--out", "result.json"],
                                   cwd=folder, env=env, capture_output=True, text=True,
                                   timeout=timeout_s)
        if completed.returncode != 0:
            raise RuntimeError(f"edge.bench exited with code {completed.returncode}: {completed.stderr[-1500:]}")
        content = (folder / "result.json").read_bytes()
    request = urllib.request.Request(result_url, data=content, method="PUT",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S).close()  # noqa: S310 (an error status raises)
    document = json.loads(content)
    create_markdown_artifact(key=f"device-benchmark-{device}", markdown=_summary(document),
                             description=f"edge.bench on {device}")
    errors = sum(row["status"] != "ok" for row in document["results"])
    logger.info("%s: %d results, %d errors", device, len(document["results"]), errors)
    return {"results": len(document["results"]), "errors": errors}
