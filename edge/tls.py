"""The device's side of the fleet's mutual TLS: one client context for every link, and the enrollment kit.

Every fleet link a device opens (the broker, bundle downloads, sample uploads) uses :func:`client_context`:
TLS 1.2 or newer, the server's certificate verified against the fleet CA *and* its host name, and the
device's own certificate presented. Nothing here falls back to plain text: once a device has TLS
settings, :func:`require_https` refuses every ``http://`` URL (and a redirect to one) with a reason.

An enrollment kit (``edgeloop fleet enroll``) is a folder::

    device.json         device id, group, broker HOST:PORT, ingest URL, certificate serial and expiry
    tls/device.crt      the device's certificate (common name: the device id)
    tls/device.key      its private key
    tls/ca.crt          the fleet CA
    keys/*.pub          the bundle-signing public keys

:func:`load_kit` reads it; the updater and the service take ``--kit DIR`` and fill their settings from it.
"""

from __future__ import annotations

import json
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from edge.errors import ConfigError
from edge.identity import is_device_id

KIT_FILE = "device.json"


@dataclass(frozen=True)
class ClientTls:
    """The files of a device's (or the control plane's) TLS identity."""

    ca: Path
    certificate: Path
    key: Path

    def context(self) -> ssl.SSLContext:
        return client_context(self)


def client_context(tls: ClientTls) -> ssl.SSLContext:
    """TLS 1.2+, the server verified against ``tls.ca`` with its host name checked, ``tls``'s certificate
    presented; :class:`ConfigError` naming the file when one is missing or unusable."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify_mode CERT_REQUIRED, check_hostname on
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_verify_locations(cafile=str(tls.ca))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"TLS CA {tls.ca} is not a usable CA certificate ({error})") from None
    try:
        context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.key))
    except (OSError, ssl.SSLError) as error:
        raise ConfigError(f"TLS certificate {tls.certificate} with key {tls.key} is not usable ({error}); "
                          "re-enroll the device with `edgeloop fleet enroll`") from None
    return context


def require_https(url: str, what: str) -> None:
    """:class:`ConfigError` unless ``url`` is https: a device with TLS settings never downgrades."""
    if urlsplit(url).scheme != "https":
        raise ConfigError(f"{what} {url!r} is not https: this device uses TLS and never sends or fetches over "
                          "plain HTTP")


@dataclass(frozen=True)
class Kit:
    """An enrollment kit, read by :func:`load_kit`."""

    root: Path
    device_id: str
    group: str
    broker: str
    ingest_url: str | None
    serial: str

    @property
    def tls(self) -> ClientTls:
        folder = self.root / "tls"
        return ClientTls(folder / "ca.crt", folder / "device.crt", folder / "device.key")

    @property
    def public_keys(self) -> Path:
        return self.root / "keys"


def load_kit(root: Path) -> Kit:
    """The kit in ``root``, checked: its files present, its ids well formed; :class:`ConfigError` otherwise."""
    root = Path(root)
    try:
        raw = json.loads((root / KIT_FILE).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"enrollment kit {root}: {KIT_FILE} is missing or not JSON ({error}); write the kit "
                          "with `edgeloop fleet enroll DEVICE --group G --out DIR`") from None
    if not isinstance(raw, dict) or not is_device_id(raw.get("device_id")) or not isinstance(raw.get("group"), str) \
            or not isinstance(raw.get("broker"), str):
        raise ConfigError(f"enrollment kit {root}: {KIT_FILE} lacks a valid device_id, group or broker")
    kit = Kit(root, raw["device_id"], raw["group"], raw["broker"], raw.get("ingest_url"), str(raw.get("serial", "")))
    missing = [str(path) for path in (kit.tls.ca, kit.tls.certificate, kit.tls.key) if not path.is_file()]
    if missing or not any(kit.public_keys.glob("*.pub")):
        raise ConfigError(f"enrollment kit {root} is incomplete (missing {', '.join(missing) or 'keys/*.pub'}); "
                          "enroll the device again")
    return kit
