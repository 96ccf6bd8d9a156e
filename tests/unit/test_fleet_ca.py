"""The fleet CA (tasks/rollout/fleet_ca.py) and the device's TLS settings (edge/tls.py), checked by real TLS
handshakes over loopback with Python's ssl module: what the broker and the ingest service will accept."""

from __future__ import annotations

import datetime as dt
import json
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.errors import ConfigError as EdgeConfigError
from edge.tls import ClientTls, client_context, load_kit, require_https
from tasks.errors import ConfigError
from tasks.monitoring.mutual_tls import server_context
from tasks.registry.bundle import generate_keypair
from tasks.rollout import fleet_ca


@pytest.fixture()
def ca(tmp_path: Path) -> fleet_ca.FleetCa:
    return fleet_ca.init_ca(tmp_path / "ca")


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _handshake(server_context: ssl.SSLContext, client: ssl.SSLContext, host: str = "127.0.0.1") -> str | None:
    """The client's common name as the server saw it, or None when either side refused the handshake."""
    listener = socket.create_server(("127.0.0.1", 0))
    seen: list[str | None] = [None]

    def serve() -> None:
        connection, _ = listener.accept()
        try:
            with server_context.wrap_socket(connection, server_side=True) as tls:
                subject = dict(item[0] for item in tls.getpeercert()["subject"])
                seen[0] = subject["commonName"]
                tls.sendall(b"ok")
        except (ssl.SSLError, OSError):
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw, \
                client.wrap_socket(raw, server_hostname=host) as tls:
            tls.recv(2)  # TLS 1.3 reports a refused client certificate only on the first read
    except (ssl.SSLError, OSError):
        pass
    thread.join(5)
    listener.close()
    return seen[0]


def _device(ca: fleet_ca.FleetCa, tmp_path: Path, name: str, file_name: str = "", **validity) -> ClientTls:
    file_name = file_name or name
    pair = fleet_ca.CertificatePair(tmp_path / f"{file_name}.crt", tmp_path / f"{file_name}.key")
    fleet_ca.issue_client(ca, name, pair, **validity)
    return ClientTls(ca.certificate_path, pair.certificate, pair.key)


def test_init_writes_a_ca_its_crl_and_the_control_plane_certificate_with_private_modes(tmp_path: Path) -> None:
    ca = fleet_ca.init_ca(tmp_path / "ca")
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(ca.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(ca.control_plane.key.stat().st_mode) == 0o600
    certificate = ca.certificate()
    assert certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    crl = x509.load_pem_x509_crl(ca.crl_path.read_bytes())
    assert crl.is_signature_valid(certificate.public_key()) and len(crl) == 0
    control_plane = _load(ca.control_plane.certificate)
    assert control_plane.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "control-plane"
    control_plane.verify_directly_issued_by(certificate)
    with pytest.raises(ConfigError, match="already holds a fleet CA"):
        fleet_ca.init_ca(tmp_path / "ca")


def test_open_ca_names_the_command_when_missing_and_refuses_a_readable_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="fleet ca init"):
        fleet_ca.open_ca(tmp_path / "nothing")
    ca = fleet_ca.init_ca(tmp_path / "ca")
    ca.key_path.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        fleet_ca.open_ca(ca.root)


def test_a_device_certificate_authenticates_and_its_revocation_is_refused(ca, tmp_path: Path) -> None:
    server = fleet_ca.issue_server(ca, "broker", ["127.0.0.1", "broker.example"])
    assert _load(server.certificate).extensions.get_extension_for_class(x509.ExtendedKeyUsage).value[0] == \
        ExtendedKeyUsageOID.SERVER_AUTH
    device = _device(ca, tmp_path, "dev-1")
    assert _handshake(server_context(ca, "broker"), client_context(device)) == "dev-1"

    revoked = fleet_ca.revoke(ca, "dev-1")
    assert len(revoked) == 1 and int(revoked[0], 16) in ca.revoked_serials()
    assert _handshake(server_context(ca, "broker"), client_context(device)) is None
    other = _device(ca, tmp_path, "dev-2")  # the CRL names only the revoked serial
    assert _handshake(server_context(ca, "broker"), client_context(other)) == "dev-2"


def test_expired_foreign_and_missing_client_certificates_are_refused(ca, tmp_path: Path) -> None:
    fleet_ca.issue_server(ca, "broker", ["127.0.0.1"])
    past = dt.datetime.now(dt.UTC) - dt.timedelta(days=30)
    expired = _device(ca, tmp_path, "old", not_before=past, not_after=past + dt.timedelta(days=1))
    assert _handshake(server_context(ca, "broker"), client_context(expired)) is None

    foreign_ca = fleet_ca.init_ca(tmp_path / "foreign")
    foreign = _device(foreign_ca, tmp_path, "dev-1")  # the right name, from another CA
    assert _handshake(server_context(ca, "broker"), ClientTls(ca.certificate_path, foreign.certificate,
                                                             foreign.key).context()) is None

    anonymous = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    anonymous.load_verify_locations(cafile=str(ca.certificate_path))
    assert _handshake(server_context(ca, "broker"), anonymous) is None


def test_the_device_refuses_a_server_that_does_not_match_the_host_or_the_ca(ca, tmp_path: Path) -> None:
    device = _device(ca, tmp_path, "dev-1")
    fleet_ca.issue_server(ca, "broker", ["broker.example"])
    assert _handshake(server_context(ca, "broker"), client_context(device), host="127.0.0.1") is None
    assert _handshake(server_context(ca, "broker"), client_context(device), host="broker.example") == "dev-1"

    impostor_ca = fleet_ca.init_ca(tmp_path / "impostor")
    fleet_ca.issue_server(impostor_ca, "broker", ["127.0.0.1"])
    assert _handshake(server_context(impostor_ca, "broker"), client_context(device)) is None


def test_rotation_keeps_the_newest_certificate_and_revokes_the_rest(ca, tmp_path: Path) -> None:
    fleet_ca.issue_server(ca, "broker", ["127.0.0.1"])
    first, second = (_device(ca, tmp_path, "dev-1", file_name) for file_name in ("first", "second"))
    assert len(fleet_ca.revoke(ca, "dev-1", keep_newest=True)) == 1
    assert _handshake(server_context(ca, "broker"), client_context(first)) is None
    assert _handshake(server_context(ca, "broker"), client_context(second)) == "dev-1"
    with pytest.raises(ConfigError, match="no certificate was issued to 'nobody'"):
        fleet_ca.revoke(ca, "nobody")


def test_a_rotated_server_certificate_is_trusted_by_devices_enrolled_before(ca, tmp_path: Path) -> None:
    device = _device(ca, tmp_path, "dev-1")
    before = _load(fleet_ca.issue_server(ca, "broker", ["127.0.0.1"]).certificate).serial_number
    rotated = fleet_ca.issue_server(ca, "broker", ["127.0.0.1"])
    assert _load(rotated.certificate).serial_number != before
    assert _handshake(server_context(ca, "broker"), client_context(device)) == "dev-1"


def test_bad_server_names_and_hosts_are_refused(ca) -> None:
    with pytest.raises(ConfigError, match="neither an IP address nor a DNS name"):
        fleet_ca.issue_server(ca, "broker", ["http://broker"])
    with pytest.raises(ConfigError, match="at least one host"):
        fleet_ca.issue_server(ca, "broker", [])
    with pytest.raises(ConfigError, match="not allowed"):
        fleet_ca.issue_server(ca, "../broker", ["broker"])


def test_enroll_writes_a_kit_the_device_reads(ca, tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "keys", "control-plane")
    kit_dir = fleet_ca.enroll(ca, "dev-1", "lab", tmp_path / "kits" / "dev-1", broker="broker.example:8883",
                              ingest_url="https://ingest.example/v1/ingest", public_keys=[public])
    kit = load_kit(kit_dir)
    assert (kit.device_id, kit.group, kit.broker) == ("dev-1", "lab", "broker.example:8883")
    assert stat.S_IMODE(kit.tls.key.stat().st_mode) == 0o600
    assert (kit.public_keys / public.name).read_bytes() == public.read_bytes()
    assert format(_load(kit.tls.certificate).serial_number, "x") == kit.serial
    assert ca.issued()[kit.serial]["subject"] == "dev-1"
    client_context(kit.tls)  # the key matches the certificate

    again = load_kit(fleet_ca.enroll(ca, "dev-1", "lab", kit_dir, broker="b:8883", ingest_url=None,
                                     public_keys=[public]))
    assert again.serial != kit.serial and again.ingest_url is None  # re-enrollment: a new key, the kit replaced


def test_enroll_refuses_bad_input_and_leaves_no_half_kit(ca, tmp_path: Path) -> None:
    _, public = generate_keypair(tmp_path / "keys", "control-plane")
    kits = tmp_path / "kits"
    for device, ingest, keys, message in (("bad id", None, [public], "not allowed"),
                                          ("control-plane", None, [public], "not allowed"),
                                          ("dev-1", "http://ingest/v1/ingest", [public], "https"),
                                          ("dev-1", None, [tmp_path / "missing.pub"], "public keys missing")):
        with pytest.raises(ConfigError, match=message):
            fleet_ca.enroll(ca, device, "lab", kits / "dev-1", broker="b:8883", ingest_url=ingest, public_keys=keys)
    for broker in ("b", "mqtts://b:8883", "b:99999"):
        with pytest.raises(ConfigError, match="HOST:PORT"):
            fleet_ca.enroll(ca, "dev-1", "lab", kits / "dev-1", broker=broker, ingest_url=None, public_keys=[public])
    with pytest.raises(ConfigError, match="at least a day"):
        fleet_ca.enroll(ca, "dev-1", "lab", kits / "dev-1", broker="b:8883", ingest_url=None, public_keys=[public],
                        days=0)
    assert not kits.exists() or not any(kits.iterdir())


def test_a_damaged_kit_is_named(tmp_path: Path) -> None:
    with pytest.raises(EdgeConfigError, match="fleet enroll"):
        load_kit(tmp_path)
    (tmp_path / "device.json").write_text(json.dumps({"device_id": "dev-1", "group": "g", "broker": "b:8883"}))
    with pytest.raises(EdgeConfigError, match="incomplete"):
        load_kit(tmp_path)


def test_client_context_names_unusable_files_and_https_is_required(ca, tmp_path: Path) -> None:
    device = _device(ca, tmp_path, "dev-1")
    with pytest.raises(EdgeConfigError, match="not a usable CA"):
        client_context(ClientTls(tmp_path / "missing.crt", device.certificate, device.key))
    other = _device(ca, tmp_path, "dev-2")
    with pytest.raises(EdgeConfigError, match="re-enroll"):
        client_context(ClientTls(ca.certificate_path, device.certificate, other.key))
    assert client_context(device).minimum_version == ssl.TLSVersion.TLSv1_2
    with pytest.raises(EdgeConfigError, match="never sends or fetches over plain HTTP"):
        require_https("http://bundles.example/b.tar.gz", "bundle URL")
    require_https("https://bundles.example/b.tar.gz", "bundle URL")


def test_a_batch_of_device_certificates_is_recorded_and_each_authenticates(ca, tmp_path: Path) -> None:
    fleet_ca.issue_server(ca, "broker", ["127.0.0.1"])
    pairs = fleet_ca.issue_clients(ca, ["sim-0", "sim-1", "sim-2"], tmp_path / "batch")
    assert {entry["subject"] for entry in ca.issued().values()} >= {"sim-0", "sim-1", "sim-2"}
    assert stat.S_IMODE(pairs["sim-2"].key.stat().st_mode) == 0o600
    chosen = ClientTls(ca.certificate_path, pairs["sim-1"].certificate, pairs["sim-1"].key)
    assert _handshake(server_context(ca, "broker"), chosen.context()) == "sim-1"
    with pytest.raises(ConfigError, match="not allowed"):
        fleet_ca.issue_clients(ca, ["sim-3", "bad id"], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
