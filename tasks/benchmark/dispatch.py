"""Which runner a device gets (``runner.kind``), and retries of transient failures (``benchmark.retries``)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tasks.benchmark.prefect_runner import PrefectRunner
from tasks.benchmark.runners import DockerRunner, LocalRunner, Runner, RunnerError, SshRunner
from tasks.config import BenchmarkParams, PackageParams
from tasks.devices import DeviceSpec

log = logging.getLogger(__name__)


def runner_for(device: DeviceSpec, params: BenchmarkParams, package: PackageParams) -> Runner:
    kind = device.runner.kind
    if kind == "local":
        return LocalRunner()
    if kind == "docker":
        return DockerRunner(params, package)
    if kind == "ssh":
        return SshRunner(params)
    return PrefectRunner(params)


def run_with_retries(runner: Runner, device: DeviceSpec, inputs: Path, params: BenchmarkParams) -> dict[str, Any]:
    """``runner.run`` with ``benchmark.retries`` more tries on transient failures; the last error raised."""
    attempt = 0
    while True:
        try:
            return runner.run(device, inputs, params.timeout_s)
        except RunnerError as error:
            if not error.transient or attempt >= params.retries:
                raise RunnerError(f"{error} (after {attempt + 1} attempt(s))", error.transient) from error
            attempt += 1
            log.warning("%s: %s; retrying (%d of %d) in %.0f s", device.name, error, attempt, params.retries,
                        params.retry_delay_s)
            time.sleep(params.retry_delay_s)
