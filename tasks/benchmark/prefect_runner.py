"""The ``prefect`` runner: the benchmark as a flow run on the device's own Prefect worker.

The ``device-benchmark`` flow (:mod:`edge.bench.prefect_flow`) is deployed once per device to the work
pool ``edge-<device>`` (created as a process pool when missing); a worker on the device polls it
(``prefect worker start --pool edge-<device>``). For each run this host serves the staged files over
HTTP on ``benchmark.serve_address`` under an unguessable path (the device checks each file's sha256)
and accepts the result document back on the same path; the flow run is started with
``run_deployment`` and waited for up to the timeout, then cancelled. Many devices run at once: the
stage calls runners in parallel (``benchmark.parallel``).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import secrets
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tasks.benchmark.runners import REPO_ROOT, RunnerError, _read_document
from tasks.benchmark.staging import RESULT_FILE
from tasks.config import BenchmarkParams
from tasks.devices import DeviceSpec

log = logging.getLogger(__name__)
FLOW_NAME = "device-benchmark"
ENTRYPOINT = "edge/bench/prefect_flow.py:device_benchmark"
MAX_RESULT_BYTES = 20 * 1024 * 1024


def pool_name(device: str) -> str:
    return f"edge-{device}"


class FileExchange:
    """Serve a folder's files read-only under a random path and accept one result document (PUT)."""

    def __init__(self, folder: Path, address: str) -> None:
        self.folder, self.token = folder, secrets.token_urlsafe(24)
        self.result: bytes | None = None
        exchange = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # quiet: the stage logs what matters
                pass

            def _name(self) -> str | None:
                prefix = f"/{exchange.token}/"
                return self.path[len(prefix):] if self.path.startswith(prefix) else None

            def do_GET(self) -> None:
                name = self._name()
                path = exchange.folder / name if name and "/" not in name else None
                if path is None or not path.is_file():
                    self.send_error(404)
                    return
                content = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            def do_PUT(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self._name() != RESULT_FILE or not 0 < length <= MAX_RESULT_BYTES:
                    self.send_error(404 if self._name() != RESULT_FILE else 413)
                    return
                exchange.result = self.rfile.read(length)
                self.send_response(204)
                self.end_headers()

        self.server = ThreadingHTTPServer((address, 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/{self.token}/{name}"

    def __enter__(self) -> FileExchange:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def ensure_deployment(device: DeviceSpec) -> str:
    """Deploy the device-benchmark flow to the device's pool (idempotent); its ``flow/deployment`` name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    workdir = device.runner.workdir or str(REPO_ROOT)
    with get_client(sync_client=True) as client:
        with contextlib.suppress(ObjectAlreadyExists):  # the pool is the device's; made once
            client.create_work_pool(WorkPoolCreate(name=pool_name(device.name), type="process",
                                                   description=f"edgeloop device {device.name}"))
        flow_id = client.create_flow_from_name(FLOW_NAME)
        client.create_deployment(
            flow_id, device.name, work_pool_name=pool_name(device.name), entrypoint=ENTRYPOINT, path=workdir,
            pull_steps=[{"prefect.deployments.steps.set_working_directory": {"directory": workdir}}],
            description=f"On-device benchmark on {device.name} (edgeloop benchmark stage)",
            tags=["edgeloop", "benchmark"])
    return f"{FLOW_NAME}/{device.name}"


class PrefectRunner:
    kind = "prefect"

    def __init__(self, params: BenchmarkParams) -> None:
        self.params = params

    def run(self, device: DeviceSpec, inputs: Path, timeout_s: float) -> dict[str, Any]:
        from prefect.deployments import run_deployment

        if self.params.serve_address in ("0.0.0.0", "::", ""):
            raise RunnerError(f"benchmark.serve_address {self.params.serve_address!r} is not an address a device can "
                              "fetch from: set this host's address on the devices' network", transient=False)
        try:
            deployment = ensure_deployment(device)
        except Exception as error:  # the Prefect API is down or refused
            raise RunnerError(f"cannot deploy the benchmark flow for {device.name}: {type(error).__name__}: "
                              f"{error}") from error
        with FileExchange(inputs, self.params.serve_address) as exchange:
            files = {path.name: {"url": exchange.url(path.name),
                                 "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
                     for path in sorted(inputs.iterdir()) if path.is_file()}
            flow_run = run_deployment(deployment, timeout=timeout_s, parameters={
                "device": device.name, "files": files, "result_url": exchange.url(RESULT_FILE),
                "timeout_s": timeout_s})
            state = flow_run.state
            if state is None or not state.is_final():
                self._cancel(flow_run.id)
                waiting = state is not None and state.type.value in ("SCHEDULED", "PENDING")
                hint = (f": no worker picked it up; start one on the device: prefect worker start --pool "
                        f"{pool_name(device.name)}") if waiting else ""
                raise RunnerError(f"flow run {flow_run.name} not finished within {timeout_s:.0f} s{hint}")
            if not state.is_completed():
                raise RunnerError(f"flow run {flow_run.name} on {pool_name(device.name)} ended {state.type.value}: "
                                  f"{state.message}", transient=False)
            if exchange.result is None:
                raise RunnerError(f"flow run {flow_run.name} completed without uploading a result", transient=False)
            document = _read_document(exchange.result.decode(), f"flow run {flow_run.name}")
        document["runner"] = {"kind": self.kind, "pool": pool_name(device.name), "flow_run_id": str(flow_run.id),
                              "flow_run": flow_run.name}
        return document

    @staticmethod
    def _cancel(flow_run_id) -> None:
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelling

        try:
            with get_client(sync_client=True) as client:
                client.set_flow_run_state(flow_run_id, Cancelling(message="edgeloop benchmark timeout"), force=True)
        except Exception as error:  # the run is reported as timed out either way
            log.warning("could not cancel flow run %s after its timeout (%s: %s)", flow_run_id,
                        type(error).__name__, error)
