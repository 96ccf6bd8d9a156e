"""The device's TLS settings: an enrollment kit fills the updater's and the service's settings (flags still win),
and a device with TLS settings never sends or fetches over plain HTTP."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge.config import load_config as load_serve_config
from edge.errors import ConfigError
from edge.sampling.upload import HttpTarget
from edge.tls import PlainHttpRefused, http_client
from edge.updater.daemon import load_config as load_updater_config
from edge.updater.fetch import RolloutFailed, fetch_bundle
from tasks.registry.bundle import generate_keypair
from tasks.rollout import fleet_ca


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("kit")
    ca = fleet_ca.init_ca(root / "ca")
    _, public = generate_keypair(root / "keys", "signer")
    return fleet_ca.enroll(ca, "dev-7", "north", root / "kit", broker="broker.example:8883",
                           ingest_url="https://ingest.example/v1/ingest", public_keys=[public])


def test_the_updater_takes_everything_from_the_kit_and_needs_no_password(kit, tmp_path) -> None:
    config = load_updater_config(["--kit", str(kit), "--store", str(tmp_path / "store")], environ={})
    assert (config.device_id, config.group, config.broker) == ("dev-7", "north", "broker.example:8883")
    assert config.host_port == ("broker.example", 8883)
    assert config.public_keys == [kit / "keys"]
    tls = config.client_tls()
    assert tls is not None and tls.mutual and tls.certificate == kit / "tls" / "device.crt"
    assert config.password() is None  # the certificate is the login


def test_flags_and_variables_win_over_the_kit(kit, tmp_path) -> None:
    config = load_updater_config(["--kit", str(kit), "--store", str(tmp_path / "s"), "--group", "south"],
                                 environ={"EDGELOOP_BROKER": "10.0.0.5:8883"})
    assert (config.group, config.broker, config.device_id) == ("south", "10.0.0.5:8883", "dev-7")


def test_the_service_takes_its_identity_and_ingest_url_from_the_kit(kit) -> None:
    config = load_serve_config(["--kit", str(kit)], environ={})
    assert (config.device_id, config.upload_to) == ("dev-7", "https://ingest.example/v1/ingest")
    assert config.client_tls().mutual
    with pytest.raises(ConfigError, match="never sends or fetches over plain HTTP"):
        load_serve_config(["--kit", str(kit), "--upload-to", "http://ingest.example/v1/ingest"], environ={})


def test_half_tls_settings_and_missing_kits_are_named(kit, tmp_path) -> None:
    with pytest.raises(ConfigError, match="tls_cert and tls_key go together"):
        load_serve_config(["--public-keys", str(kit / "keys"), "--tls-ca", str(kit / "tls" / "ca.crt"),
                           "--tls-cert", str(kit / "tls" / "device.crt")], environ={})
    with pytest.raises(ConfigError, match="--tls-key .*does not exist"):
        load_serve_config(["--public-keys", str(kit / "keys"), "--tls-ca", str(kit / "tls" / "ca.crt"),
                           "--tls-cert", str(kit / "tls" / "device.crt"), "--tls-key", str(tmp_path / "none")],
                          environ={})
    with pytest.raises(ConfigError, match="fleet enroll"):
        load_updater_config(["--kit", str(tmp_path), "--store", str(tmp_path / "s")], environ={})


def test_no_plain_http_once_tls_is_set(kit, tmp_path) -> None:
    tls = load_updater_config(["--kit", str(kit), "--store", str(tmp_path / "s")], environ={}).client_tls()
    with pytest.raises(PlainHttpRefused):
        HttpTarget("http://ingest.example/v1/ingest", "dev-7", None, tls=tls)
    with pytest.raises(RolloutFailed) as refused:
        fetch_bundle("http://bundles.example/v2.tar.gz", tmp_path / "b", 1 << 20, tls=tls)
    assert refused.value.reason == "insecure_url"
    local = tmp_path / "local.tar.gz"
    local.write_bytes(b"bytes")
    fetch_bundle(local.as_uri(), tmp_path / "copy", 1 << 20, tls=tls)  # a file on the device is no network link
    with http_client(tls, 5.0) as client, pytest.raises(PlainHttpRefused):
        client.get("http://127.0.0.1:9/")  # what a redirect to plain HTTP would request: refused before sending
