"""The fleet on mutual TLS, for real: a fleet CA (tasks/rollout/fleet_ca.py), devices enrolled with kits, Debian's
Mosquitto with a TLS listener that takes the login from the client certificate, the ingest service serving
bundles and taking uploads over HTTPS with client certificates, and ``python -m edge.updater`` processes
started from nothing but their kits.

Negative MQTT checks are synchronised by a barrier: the same sender's next, allowed message on the same
path (the broker keeps one sender's messages in order for one subscriber).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from edge.files import sha256_file
from edge.rollout import RolloutManifest, model_topic, sign_rollout, status_topic
from edge.tls import ClientTls, Kit, load_kit
from tasks.rollout import fleet, fleet_ca
from tasks.rollout.broker import TlsFiles
from tests.conftest import REPO_ROOT, require_system_tools
from tests.edge_helpers import sample_file_bytes
from tests.mqtt_helpers import Peer
from tests.stack_helpers import terminate_all, wait_for
from tests.tls_helpers import start_tls_ingest

pytestmark = pytest.mark.integration
GROUP = "lab"
DEVICES = ("dev-a", "dev-b", "dev-c")


@dataclass
class TlsFleet:
    root: Path
    ca: fleet_ca.FleetCa
    broker: object          # tasks.stack.mosquitto.Broker
    ingest_url: str
    kits: dict[str, Kit]
    bundles: Path
    collected: Path

    @property
    def fleet_file(self) -> Path:
        return self.root / "fleet.yaml"

    @property
    def credentials(self) -> Path:
        return self.root / "credentials"

    def control_plane(self) -> Peer:
        pair = self.ca.control_plane
        return Peer(self.broker.port, None, None, tls=ClientTls(self.ca.certificate_path, pair.certificate,
                                                                 pair.key).context())

    def device(self, name: str) -> Peer:
        return Peer(self.broker.port, None, None, tls=self.kits[name].tls.context())

    def bundle_url(self, name: str, host: str = "127.0.0.1") -> str:
        return f"{self.ingest_url.replace('127.0.0.1', host)}/v1/bundles/{name}"

    def reload_broker(self) -> None:
        from tasks.stack import mosquitto

        assert mosquitto.reload_mosquitto(self.root / "run")  # a TLS broker restarts: listening again on return


def _connects(port: int, context: ssl.SSLContext) -> bool:
    """Whether the broker accepts an MQTT session over ``context`` (a refused handshake is False)."""
    try:
        peer = Peer(port, None, None, tls=context)
    except (ssl.SSLError, OSError):
        return False
    accepted = peer.connack is not None and not peer.connack.is_failure and not peer.disconnects
    peer.close()
    return accepted


def _answer_to_plain_mqtt(port: int) -> bytes:
    """What the broker's TLS port answers a plain MQTT CONNECT with (empty: it closed the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as plain:
        plain.sendall(b"\x10\x10\x00\x04MQTT\x05\x02\x00\x3c\x00\x00\x03abc")
        try:
            return plain.recv(16)
        except ConnectionResetError:
            return b""


@pytest.fixture(scope="module")
def tls_fleet(tmp_path_factory, bundle_kit) -> Iterator[TlsFleet]:
    from tasks.stack import mosquitto, services

    require_system_tools("mosquitto", packages="mosquitto")
    root = tmp_path_factory.mktemp("fleet-tls")
    ca = fleet_ca.init_ca(root / "ca")
    broker_pair = fleet_ca.issue_server(ca, "broker", ["127.0.0.1"])
    fleet_ca.issue_server(ca, "ingest", ["127.0.0.1"])  # not "localhost": the wrong-host check uses that name
    bundles, collected = root / "bundles", root / "collected"
    bundles.mkdir()
    try:
        ingest_url = start_tls_ingest(root / "run", ca, bundles, collected)
        port = services.free_port()
        public_keys = sorted(bundle_kit.public_dir.glob("*.pub"))
        kits = {device: load_kit(fleet.enroll_device(
            root / "fleet.yaml", root / "credentials", ca.root, device, GROUP, root / "kits" / device,
            broker=f"127.0.0.1:{port}", ingest_url=f"{ingest_url}/v1/ingest", public_keys=public_keys))
            for device in DEVICES}
        broker = mosquitto.start_mosquitto(root / "run", port, None, root / "credentials" / fleet.ACL_FILE,
                                           tls=TlsFiles(ca.certificate_path, broker_pair.certificate,
                                                        broker_pair.key, ca.crl_path))
        yield TlsFleet(root, ca, broker, ingest_url, kits, bundles, collected)
    finally:
        try:
            mosquitto.stop_mosquitto(root / "run")
        finally:
            services.stop("ingest", root / "run")


@pytest.fixture()
def updater(tls_fleet, tmp_path) -> Iterator:
    """``start(device, bundle)``: the device's store provisioned with ``bundle``, then ``python -m edge.updater
    --kit`` on it: the kit is all it is told about the fleet."""
    from edge.signing import load_public_keys
    from edge.store.model_store import ModelStore

    started: list[subprocess.Popen] = []

    def start(device: str, bundle: Path) -> tuple[Path, subprocess.Popen]:
        kit = tls_fleet.kits[device]
        store = tmp_path / device / "store"
        ModelStore(store, load_public_keys([kit.public_keys])).install(bundle)
        command = [sys.executable, "-m", "edge.updater", "--kit", str(kit.root), "--store", str(store),
                   "--max-backoff-s", "2", "--fetch-attempts", "2"]
        with open(tmp_path / f"{device}.log", "ab") as log:
            started.append(subprocess.Popen(command, cwd=REPO_ROOT, env=dict(os.environ), stdout=log,
                                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL))
        return store, started[-1]

    try:
        yield start
    finally:
        terminate_all(started)


def _manifest(fleet_tls: TlsFleet, bundle: Path, version: str, sequence: int,
              url: str | None = None) -> RolloutManifest:
    return RolloutManifest(rollout_id="tls-test", group=GROUP, sequence=sequence, action="install",
                           model_name="edgeloop-digits", version=version,
                           bundle_url=url or fleet_tls.bundle_url(bundle.name), bundle_sha256=sha256_file(bundle),
                           cohort_cutoff=1.0, stage="full", jitter_s=0.1, issued_at=time.time(), reason="")


def _status(control: Peer, device: str, sequence: int) -> dict:
    topic = status_topic(GROUP, device)

    def reported() -> dict | None:
        for message in reversed(list(control.messages)):
            if message.topic == topic:
                status = json.loads(message.payload)
                if status.get("sequence") == sequence and status.get("state") in ("installed", "failed"):
                    return status
        return None

    return wait_for(reported, 60, f"{device} to report on sequence {sequence}", interval_s=0.05)


def _watching_statuses(tls_fleet: TlsFleet) -> Peer:
    """The control plane subscribed to the group's statuses, with no retained manifest an earlier test left."""
    control = tls_fleet.control_plane()
    assert control.subscribe(f"fleet/{GROUP}/status/+") == 1
    assert control.publish(model_topic(GROUP), b"", retain=True) in (0, 16)
    return control


def _publish(control: Peer, manifest: RolloutManifest, bundle_kit) -> None:
    assert control.publish(model_topic(GROUP), sign_rollout(manifest, bundle_kit.private_key), retain=True) in (0, 16)


def test_enrolled_devices_take_a_rollout_and_upload_over_mutual_tls(tls_fleet, updater, bundle_kit, tmp_path):
    """Two updaters know nothing but their kits: they fetch the bundle over HTTPS with their certificates,
    install it and report; a device uploads samples as itself, and cannot claim another's name."""
    v1, v2 = bundle_kit.bundle("v1"), bundle_kit.bundle("v2", primary="tflite_fp32")
    (tls_fleet.bundles / v2.name).write_bytes(v2.read_bytes())
    control = tls_fleet.control_plane()
    try:
        assert control.subscribe(f"fleet/{GROUP}/status/+") == 1
        stores = {device: updater(device, v1)[0] for device in ("dev-a", "dev-b")}
        _publish(control, _manifest(tls_fleet, v2, "v2", 1), bundle_kit)
        for device, store in stores.items():
            status = _status(control, device, 1)
            assert (status["state"], status["version"]) == ("installed", "v2"), status
            assert json.loads((store / "state.json").read_text())["active"] == "v2"
    finally:
        control.close()

    from edge.errors import UploadError
    from edge.sampling.upload import HttpTarget

    sample = tmp_path / "samples-0001.npz"
    sample.write_bytes(sample_file_bytes(tmp_path, "dev-a"))
    kit = tls_fleet.kits["dev-a"]
    with HttpTarget(kit.ingest_url, "dev-a", None, tls=kit.tls) as target:
        target.send(sample)
    assert (tls_fleet.collected / "dev-a--samples-0001.npz").read_bytes() == sample.read_bytes()
    with HttpTarget(kit.ingest_url, "dev-b", None, tls=kit.tls) as impostor, pytest.raises(UploadError, match="403"):
        impostor.send(sample)  # dev-a's certificate, dev-b's name
    with pytest.raises(httpx.HTTPError):  # no client certificate: the handshake itself is refused
        httpx.post(kit.ingest_url, content=sample.read_bytes(), verify=ClientTls(kit.tls.ca).context())


def test_certificates_that_must_not_connect(tls_fleet, tmp_path):
    """Revoked, expired, from another CA, none at all, or TLS older than 1.2: no session. A valid one: a session."""
    ca, port = tls_fleet.ca, tls_fleet.broker.port
    assert _connects(port, tls_fleet.kits["dev-b"].tls.context())  # the control for every refusal below

    def client(name: str, issuer: fleet_ca.FleetCa = ca, **validity) -> ClientTls:
        pair = fleet_ca.CertificatePair(tmp_path / f"{name}.crt", tmp_path / f"{name}.key")
        fleet_ca.issue_client(issuer, name, pair, **validity)
        return ClientTls(ca.certificate_path, pair.certificate, pair.key)

    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=10)
    assert not _connects(port, client("dev-b", not_before=past, not_after=past + dt.timedelta(days=1)).context())
    assert not _connects(port, client("dev-b", issuer=fleet_ca.init_ca(tmp_path / "other-ca")).context())
    assert not _connects(port, ClientTls(ca.certificate_path).context())

    old_tls = client("dev-b").context()
    with warnings.catch_warnings():  # deprecated on purpose: a device stuck on TLS 1.1
        warnings.simplefilter("ignore", DeprecationWarning)
        old_tls.minimum_version = old_tls.maximum_version = ssl.TLSVersion.TLSv1_1
    old_tls.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1: the broker must be the one refusing
    assert not _connects(port, old_tls)
    assert _answer_to_plain_mqtt(port)[:1] != b"\x20"  # MQTT in the clear on the TLS port: never a CONNACK

    revoked = client("dev-x")
    assert _connects(port, revoked.context())
    fleet_ca.revoke(ca, "dev-x")
    tls_fleet.reload_broker()
    assert not _connects(port, revoked.context())


def test_the_https_endpoint_refuses_old_tls_and_revoked_certificates(tls_fleet, tmp_path):
    """The ingest/bundle service: TLS 1.1 gets no handshake even with a valid certificate; a certificate revoked
    while the service runs is refused at its next request (403 revoked), a valid one is served."""
    kit = tls_fleet.kits["dev-b"]
    old = kit.tls.context()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{tls_fleet.ingest_url}/healthz", verify=old)
    assert httpx.get(f"{tls_fleet.ingest_url}/healthz", verify=kit.tls.context()).status_code == 200

    pair = fleet_ca.CertificatePair(tmp_path / "late.crt", tmp_path / "late.key")
    fleet_ca.issue_client(tls_fleet.ca, "dev-late", pair)
    late = ClientTls(tls_fleet.ca.certificate_path, pair.certificate, pair.key)
    with httpx.Client(verify=late.context()) as client:  # one connection: its handshake predates the revocation
        assert client.get(tls_fleet.bundle_url("none.tar.gz")).status_code == 404  # authenticated, no such file
        fleet_ca.revoke(tls_fleet.ca, "dev-late")
        refused = client.get(tls_fleet.bundle_url("none.tar.gz"))
    assert refused.status_code == 403 and "revoked" in refused.text


def test_a_valid_certificate_grants_only_its_own_topics(tls_fleet):
    """dev-a, with its own valid certificate, cannot publish a manifest nor read dev-b's status."""
    control, dev_a, dev_b = tls_fleet.control_plane(), tls_fleet.device("dev-a"), tls_fleet.device("dev-b")
    try:
        assert control.subscribe(f"fleet/{GROUP}/#") == 1
        # Mosquitto grants subscriptions and applies the read ACL to every delivery
        assert dev_a.subscribe(status_topic(GROUP, "dev-b")) == 1
        assert dev_a.subscribe(f"fleet/{GROUP}/status/+") == 1
        assert dev_a.subscribe(model_topic(GROUP)) == 1
        before = len(dev_a.messages)
        dev_a.publish(model_topic(GROUP), b'{"forged": true}')
        dev_a.publish(status_topic(GROUP, "dev-a"), b"barrier-a")
        control.received(status_topic(GROUP, "dev-a"), b"barrier-a")
        assert all(message.payload != b'{"forged": true}' for message in control.messages)
        dev_b.publish(status_topic(GROUP, "dev-b"), b"secret-of-b")
        control.received(status_topic(GROUP, "dev-b"), b"secret-of-b")  # the broker has routed it by now
        control.publish(model_topic(GROUP), b"barrier-b")  # routed after it, to a topic dev-a may read
        dev_a.received(model_topic(GROUP), b"barrier-b", since=before)
        assert status_topic(GROUP, "dev-b") not in dev_a.topics()
    finally:
        for peer in (control, dev_a, dev_b):
            peer.close()


def test_revoking_a_connected_device_cuts_it_off(tls_fleet):
    """A device revoked while its session is open is disconnected when the broker applies the change, cannot
    come back, and is out of the fleet and the ACL; the others reconnect and get the next manifest."""
    doomed, kept = tls_fleet.device("dev-c"), tls_fleet.device("dev-b")
    assert doomed.subscribe(model_topic(GROUP)) == 1
    fleet.revoke_device(tls_fleet.fleet_file, tls_fleet.credentials, tls_fleet.ca.root, "dev-c")
    tls_fleet.reload_broker()
    try:
        doomed.wait(lambda: bool(doomed.disconnects), "the revoked session to be closed")
        assert "dev-c" not in fleet.load_fleet(tls_fleet.fleet_file).devices
        assert "user dev-c" not in (tls_fleet.credentials / fleet.ACL_FILE).read_text()
        assert not _connects(tls_fleet.broker.port, tls_fleet.kits["dev-c"].tls.context())
        kept.close()
        control, kept = tls_fleet.control_plane(), tls_fleet.device("dev-b")
        assert kept.subscribe(model_topic(GROUP)) == 1
        assert control.publish(model_topic(GROUP), b"after-revocation") in (0, 16)
        kept.received(model_topic(GROUP), b"after-revocation")
        control.close()
    finally:
        doomed.client.loop_stop()  # paho would keep trying to reconnect a certificate the broker refuses
        kept.close()


def test_plain_http_and_a_wrong_host_are_refused_and_the_device_keeps_its_version(tls_fleet, updater, bundle_kit):
    """A manifest naming an http:// bundle, or a host the server's certificate does not name: the device
    reports the failure with its reason and keeps serving what it had."""
    v1, v3 = bundle_kit.bundle("v1"), bundle_kit.bundle("v3", primary="tflite_fp32")
    (tls_fleet.bundles / v3.name).write_bytes(v3.read_bytes())
    control = _watching_statuses(tls_fleet)
    try:
        store, _ = updater("dev-a", v1)
        plain = tls_fleet.bundle_url(v3.name).replace("https://", "http://")
        _publish(control, _manifest(tls_fleet, v3, "v3", 11, url=plain), bundle_kit)
        status = _status(control, "dev-a", 11)
        assert (status["state"], status["reason"], status["version"]) == ("failed", "insecure_url", "v1"), status
        _publish(control, _manifest(tls_fleet, v3, "v3", 12, url=tls_fleet.bundle_url(v3.name, "localhost")),
                 bundle_kit)
        status = _status(control, "dev-a", 12)
        assert (status["state"], status["reason"], status["version"]) == ("failed", "tls_failed", "v1"), status
        assert json.loads((store / "state.json").read_text())["active"] == "v1"
        _publish(control, _manifest(tls_fleet, v3, "v3", 13), bundle_kit)  # the right URL still works after
        assert _status(control, "dev-a", 13)["version"] == "v3"
    finally:
        control.close()


def test_a_rotated_broker_certificate_under_a_running_fleet(tls_fleet, updater, bundle_kit):
    """The broker's certificate is re-issued and the broker restarted while a device is away (its updater
    paused) with a manifest queued for it: the device reconnects, verifies the new certificate against the
    same CA, and installs what was queued."""
    from tasks.stack import mosquitto

    v1, v4 = bundle_kit.bundle("v1"), bundle_kit.bundle("v4", primary="tflite_fp32")
    (tls_fleet.bundles / v4.name).write_bytes(v4.read_bytes())
    control = _watching_statuses(tls_fleet)
    try:
        store, process = updater("dev-b", v1)
        log = store.parent.parent / "dev-b.log"
        wait_for(lambda: "connected to the broker" in log.read_text(), 30, "dev-b to connect")
        process.send_signal(signal.SIGSTOP)  # away: its session stays, nothing reaches the paused process
        before = _served_serial(tls_fleet.broker.port)
        fleet_ca.issue_server(tls_fleet.ca, "broker", ["127.0.0.1"])
        _publish(control, _manifest(tls_fleet, v4, "v4", 21), bundle_kit)
        control.close()
        tls_fleet.broker = mosquitto.restart_mosquitto(tls_fleet.root / "run", tls_fleet.broker)
        assert _served_serial(tls_fleet.broker.port) != before
        assert json.loads((store / "state.json").read_text())["active"] == "v1"  # it never saw the manifest
        process.send_signal(signal.SIGCONT)
        control = tls_fleet.control_plane()
        assert control.subscribe(f"fleet/{GROUP}/status/+") == 1
        assert _status(control, "dev-b", 21)["version"] == "v4"
        assert json.loads((store / "state.json").read_text())["active"] == "v4"
    finally:
        control.close()


def _served_serial(port: int) -> int:
    """The serial of the certificate the broker presents now."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        from cryptography import x509

        return x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
