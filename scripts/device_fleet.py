"""Simulated devices on this host, for the rollout tests and ``make demo-loop``.

Each device is what a real one runs: the edge service (``python -m edge.serving.serve``) on its own port and
model store, and the updater (``python -m edge.updater``) beside it with the device's own broker login (a
password, or the certificate of its enrollment kit: ``kit=``), reporting telemetry from the service's
``/metrics``. A device runs on loopback, or in a network namespace of its own (``netns=``, ``address=``:
a host of its own on a test network, reaching the broker and the ingest service across it). A device is
provisioned with a signed bundle before it starts, as a factory image would be. :meth:`DeviceFleet.traffic`
sends each device requests from a dataset, the way its camera or sensor would, so the telemetry carries real
latencies and confidences.

Processes and logs live under ``root/<device>/``; :meth:`DeviceFleet.stop` ends them all.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from tasks.stack import services
from tasks.stack.services import REPO_ROOT


@dataclass
class SimulatedDevice:
    device_id: str
    root: Path
    url: str
    updater: subprocess.Popen
    requests: int = 0
    errors: int = 0

    @property
    def store(self) -> Path:
        return self.root / "store"

    @property
    def log(self) -> Path:
        return self.root / "updater.log"

    def served_version(self) -> str | None:
        """The version the service serves now (None when it has none or does not answer)."""
        try:
            return httpx.get(f"{self.url}/readyz", timeout=5.0).json().get("version")
        except (httpx.HTTPError, ValueError):
            return None


@dataclass
class DeviceFleet:
    """Devices of one group talking to ``broker``; start them with :meth:`start`."""

    root: Path
    broker: str
    group: str
    public_keys: Path
    telemetry_interval_s: float = 1.0
    devices: dict[str, SimulatedDevice] = field(default_factory=dict)

    def start(self, device_id: str, password: str | None, bundle: Path | None = None, *, kit: Path | None = None,
              netns: str | None = None, address: str = "127.0.0.1", updater_args: tuple[str, ...] = (),
              **settings: object) -> SimulatedDevice:
        """Provision ``device_id`` with ``bundle`` (installed into its store) and start its service and updater:
        with its broker ``password``, or with its enrollment ``kit`` (mutual TLS: the kit also gives the
        service its identity and the https ingest URL), in network namespace ``netns`` at ``address``;
        ``updater_args`` go to the updater (``--device-class``, ``--runtimes``), ``settings`` to the service."""
        from edge.signing import load_public_keys
        from edge.store.model_store import ModelStore

        root = self.root / device_id
        (root / "run").mkdir(parents=True, exist_ok=True)
        if bundle is not None and not (root / "store").exists():
            ModelStore(root / "store", load_public_keys([self.public_keys])).install(bundle)
        (root / "temp").write_text("40000\n")  # the service's thermal sensor (millidegrees), well below its limit
        identity = {"kit": kit} if kit is not None else {"public_keys": self.public_keys, "device_id": device_id}
        service = services.start_edge_server(root / "run", services.free_port(), {
            "store": root / "store", "samples_dir": root / "samples", "thermal_sensor": root / "temp",
            "watch_interval_s": 0.5, "num_threads": 1, **identity, **settings}, name="edge-serve", host=address,
            netns=netns)
        if kit is not None:
            login = ["--kit", str(kit)]
        else:
            secret = root / "mqtt-password"
            secret.write_text(f"{password}\n")
            secret.chmod(0o600)
            login = ["--broker", self.broker, "--device", device_id, "--group", self.group, "--password-file",
                     str(secret), "--public-keys", str(self.public_keys)]
        command = [sys.executable, "-m", "edge.updater", *login, "--store", str(root / "store"),
                   "--service-url", service.url, "--telemetry-interval-s", f"{self.telemetry_interval_s:g}",
                   "--max-backoff-s", "5", *updater_args]
        if netns is not None:
            command = ["ip", "netns", "exec", netns, *command]
        with open(root / "updater.log", "ab") as log:
            updater = subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        device = SimulatedDevice(device_id, root, service.url, updater)
        self.devices[device_id] = device
        return device

    def stop(self) -> None:
        for device in self.devices.values():
            if device.updater.poll() is None:
                device.updater.send_signal(signal.SIGTERM)
            services.stop("edge-serve", device.root / "run")
        for device in self.devices.values():
            try:
                device.updater.wait(10)
            except subprocess.TimeoutExpired:
                device.updater.kill()
                device.updater.wait()

    def versions(self) -> dict[str, str | None]:
        """What every device's service serves now."""
        return {device_id: device.served_version() for device_id, device in self.devices.items()}

    @contextmanager
    def traffic(self, inputs: np.ndarray, rate_per_device_hz: float = 5.0, seed: int = 0) -> Iterator[None]:
        """Send every device single-sample requests drawn from ``inputs`` in a background thread."""
        stop = threading.Event()
        thread = threading.Thread(target=self._send, args=(inputs, rate_per_device_hz, seed, stop), daemon=True,
                                  name="device-traffic")
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(30)

    def _send(self, inputs: np.ndarray, rate_hz: float, seed: int, stop: threading.Event) -> None:
        rng = np.random.default_rng(seed)
        clients = {device_id: httpx.Client(base_url=device.url, timeout=10.0)
                   for device_id, device in self.devices.items()}
        period = 1.0 / rate_hz
        try:
            while not stop.is_set():
                started = time.monotonic()
                for device_id, client in clients.items():
                    buffer = io.BytesIO()
                    np.save(buffer, inputs[rng.integers(len(inputs))][None])
                    device = self.devices[device_id]
                    try:
                        response = client.post("/v1/predict", content=buffer.getvalue(),
                                               headers={"content-type": "application/x-npy"})
                        device.requests += 1
                        device.errors += response.status_code >= 400
                    except httpx.HTTPError:
                        device.errors += 1
                stop.wait(max(0.0, period - (time.monotonic() - started)))
        finally:
            for client in clients.values():
                client.close()
