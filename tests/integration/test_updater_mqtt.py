"""Fleet rollout for real: a Mosquitto broker, ``python -m edge.updater`` processes, the edge service beside one.

A control plane (this test) publishes signed, retained manifests; every updater installs and acks on its
retained status topic, a rollback returns them to the previous version, a late updater gets the retained
manifest, and one SIGKILLed in the middle of its install comes back on a consistent version and acks.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from edge.files import sha256_file
from edge.rollout import RolloutManifest, model_topic, sign_rollout
from edge.store.model_store import PAUSE_ENV, ModelStore
from tasks.stack.services import free_port
from tests.conftest import REPO_ROOT, require_system_tools
from tests.edge_helpers import running_edge_server
from tests.stack_helpers import terminate_all, wait_for

pytestmark = pytest.mark.integration
GROUP = "lab"
MOSQUITTO = "/usr/sbin/mosquitto"


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@contextmanager
def running_broker(folder: Path, port: int) -> Iterator[int]:
    """An anonymous Mosquitto 2 on loopback ``port``, without persistence (a restart forgets everything)."""
    require_system_tools("mosquitto", packages="mosquitto")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "mosquitto.conf"
    config.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                      + ("user root\n" if os.geteuid() == 0 else ""))
    binary = shutil.which("mosquitto", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin"])) or MOSQUITTO
    with open(folder / "mosquitto.log", "ab") as log:
        process = subprocess.Popen([binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: _listening(port) or process.poll() is not None, 20, "mosquitto to listen", interval_s=0.05)
        assert process.poll() is None, (folder / "mosquitto.log").read_text()
        yield port
    finally:
        process.terminate()
        process.wait(10)


@pytest.fixture(scope="module")
def broker(tmp_path_factory) -> Iterator[int]:
    """The module's broker (anonymous: the ACL tests use per-device passwords)."""
    with running_broker(tmp_path_factory.mktemp("mosquitto"), free_port()) as port:
        yield port


class ControlPlane:
    """Publishes signed manifests and keeps the latest message of every status and telemetry topic."""

    def __init__(self, port: int, private_key) -> None:
        self.private_key, self.latest, self._lock = private_key, {}, threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="test-control-plane",
                                  protocol=mqtt.MQTTv5)
        self.client.on_message = self._received
        self.client.on_connect = lambda client, *_: client.subscribe(
            [(f"fleet/{GROUP}/status/+", mqtt.SubscribeOptions(qos=1)),
             (f"fleet/{GROUP}/telemetry/+", mqtt.SubscribeOptions(qos=1))])
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _received(self, client, userdata, message) -> None:
        with self._lock:
            self.latest[message.topic] = json.loads(message.payload)

    def status(self, device: str) -> dict:
        with self._lock:
            return self.latest.get(f"fleet/{GROUP}/status/{device}", {})

    def telemetry(self, device: str) -> dict:
        with self._lock:
            return self.latest.get(f"fleet/{GROUP}/telemetry/{device}", {})

    def forget(self) -> None:
        with self._lock:
            self.latest.clear()

    def publish(self, manifest: RolloutManifest) -> None:
        wait_for(self.client.is_connected, 20, "the control plane to be connected", interval_s=0.05)
        info = self.client.publish(model_topic(GROUP), sign_rollout(manifest, self.private_key), qos=1, retain=True)
        info.wait_for_publish(10)

    def wait_status(self, device: str, sequence: int, version: str, timeout_s: float = 30.0) -> dict:
        def acked() -> dict | None:
            status = self.status(device)
            return status if status.get("sequence") == sequence and status.get("state") in ("installed",
                                                                                            "failed") else None
        status = wait_for(acked, timeout_s, f"{device} to report on sequence {sequence}", interval_s=0.05)
        assert (status["state"], status["version"], status["target"]) == ("installed", version, version), status
        return status

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def manifest(bundle: Path, version: str, sequence: int, action: str = "install") -> RolloutManifest:
    return RolloutManifest(rollout_id="fleet-test", group=GROUP, sequence=sequence, action=action,
                           model_name="edgeloop-digits", version=version, bundle_url=bundle.as_uri(),
                           bundle_sha256=sha256_file(bundle), cohort_cutoff=1.0, stage="full", jitter_s=0.2,
                           issued_at=time.time(), reason="error rate up in the canary" if action == "rollback" else "")


@contextmanager
def updaters(tmp_path: Path, port: int, public_dir: Path) -> Iterator:
    """``start(device, store, **env)`` runs ``python -m edge.updater``; all are killed at the end."""
    started: list[subprocess.Popen] = []
    password = tmp_path / "mqtt-password"
    password.write_text("device-secret\n")

    def start(device: str, store: Path, *options: str, env: dict | None = None) -> subprocess.Popen:
        command = [sys.executable, "-m", "edge.updater", "--broker", f"127.0.0.1:{port}", "--device", device,
                   "--group", GROUP, "--password-file", str(password), "--store", str(store),
                   "--public-keys", str(public_dir), "--telemetry-interval-s", "1", *options]
        log = open(tmp_path / f"{device}.log", "ab")
        process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **(env or {})}, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        started.append(process)
        return process

    try:
        yield start
    finally:
        terminate_all(started)


def stopped(pid: int) -> bool:
    """True once the process stopped itself (SIGSTOP at the store's pause step): state T in /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_rollout_rollback_late_joiner_and_crash_recovery(tmp_path, broker, bundle_kit):
    keys = bundle_kit.trusted_keys()
    v1, v2 = (bundle_kit.bundle(version, name=f"fleet-{version}.tar.gz") for version in ("v1", "v2"))
    stores = {device: tmp_path / device / "store" for device in ("device-a", "device-b", "device-c", "device-d")}
    for device in ("device-a", "device-b"):  # the fleet runs v1 before the rollout
        ModelStore(stores[device], keys).install(v1)
    sample = bundle_kit.sample[:1]
    control = ControlPlane(broker, bundle_kit.private_key)
    try:
        with running_edge_server(tmp_path / "device-a", bundle_kit.public_dir) as server, \
                updaters(tmp_path, broker, bundle_kit.public_dir) as start:
            start("device-a", stores["device-a"], "--service-url", server.url)
            start("device-b", stores["device-b"])

            control.publish(manifest(v2, "v2", 1))
            for device in ("device-a", "device-b"):
                control.wait_status(device, 1, "v2")
            # the service beside device-a's updater switches by itself: it watches the store's state
            wait_for(lambda: server.predict(sample).json()["version"] == "v2", 20, "the service to serve v2",
                     interval_s=0.1)
            for _ in range(5):
                assert server.predict(sample).status_code == 200
            summary = wait_for(lambda: (t := control.telemetry("device-a")).get("version") == "v2"
                               and t["requests"] >= 1 and t, 20, "a telemetry summary of v2's requests",
                               interval_s=0.1)
            assert summary["errors"] == 0 and summary["p50_ms"] > 0 and 0 < summary["mean_confidence"] <= 1
            assert set(summary) == {"device", "version", "window_s", "requests", "errors", "error_rate", "p50_ms",
                                    "p95_ms", "mean_confidence", "at"}

            control.publish(manifest(v1, "v1", 2, action="rollback"))
            for device in ("device-a", "device-b"):
                control.wait_status(device, 2, "v1")
                state = ModelStore(stores[device], keys).state()
                assert state.active == "v1" and "error rate up" in state.rolled_back["v2"]
            wait_for(lambda: server.predict(sample).json()["version"] == "v1", 20, "the service to serve v1 again",
                     interval_s=0.1)

            start("device-c", stores["device-c"])  # joins after the manifest: the retained copy reaches it
            crashing = start("device-d", stores["device-d"], env={PAUSE_ENV: "placed"})
            wait_for(lambda: stopped(crashing.pid) or crashing.poll() is not None, 30,
                     "device-d to pause in the middle of its install", interval_s=0.05)
            assert crashing.poll() is None, (tmp_path / "device-d.log").read_text()
            crashing.kill()
            crashing.wait()
            halfway = ModelStore(stores["device-d"], keys)  # what the restarted updater opens
            assert halfway.problems() == [] and halfway.state().active is None
            assert control.status("device-d") == {}  # killed before any outcome: nothing was acked
            start("device-d", stores["device-d"])
            control.wait_status("device-c", 2, "v1")
            control.wait_status("device-d", 2, "v1")
            recovered = ModelStore(stores["device-d"], keys)
            assert recovered.problems() == [] and recovered.state().active == "v1"
    finally:
        control.close()

    late = ControlPlane(broker, bundle_kit.private_key)  # the statuses are retained for a control plane restarting
    try:
        for device in stores:
            wait_for(lambda device=device: late.status(device).get("sequence") == 2, 10,
                     f"the retained status of {device}", interval_s=0.05)
            assert late.status(device)["state"] == "installed"
    finally:
        late.close()


def test_the_updater_rides_out_a_broker_outage(tmp_path, bundle_kit):
    """Started before its broker, then the broker restarts (forgetting sessions and retained messages):
    the updater reconnects, reports its last status again and applies the next manifest."""
    port, store = free_port(), tmp_path / "device-e" / "store"
    v1, v2 = (bundle_kit.bundle(version, name=f"outage-{version}.tar.gz") for version in ("v1", "v2"))
    with updaters(tmp_path, port, bundle_kit.public_dir) as start:
        start("device-e", store, "--max-backoff-s", "1")
        wait_for(lambda: "unreachable" in (tmp_path / "device-e.log").read_text(), 30,
                 "the updater to find no broker", interval_s=0.05)
        with running_broker(tmp_path / "broker", port):
            control = ControlPlane(port, bundle_kit.private_key)
            control.publish(manifest(v1, "v1", 1))
            control.wait_status("device-e", 1, "v1")
        control.forget()
        with running_broker(tmp_path / "broker", port):
            try:
                control.wait_status("device-e", 1, "v1")  # the restarted broker forgot it: republished on reconnect
                control.publish(manifest(v2, "v2", 2))  # once the control plane reconnected
                control.wait_status("device-e", 2, "v2")
            finally:
                control.close()
    assert ModelStore(store, bundle_kit.trusted_keys()).state().active == "v2"
