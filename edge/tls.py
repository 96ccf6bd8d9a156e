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
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edge.errors import ConfigError
from edge.identity import is_device_id
from edge.schema import Record, setting

KIT_FILE = "device.json"


@dataclass(frozen=True)
class ClientTls:
    """The files of a device's (or the control plane's) TLS identity; without a certificate the server is
    still verified, and the client authenticates some other way (a password, a token)."""

    ca: Path
    certificate: Path | None = None
    key: Path | None = None

    @property
    def mutual(self) -> bool:
        return self.certificate is not None

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
    if tls.certificate is not None:
        try:
            context.load_cert_chain(certfile=str(tls.certificate), keyfile=str(tls.key or tls.certificate))
        except (OSError, ssl.SSLError) as error:
            raise ConfigError(f"TLS certificate {tls.certificate} with key {tls.key} is not usable ({error}); "
                              "re-enroll the device with `edgeloop fleet enroll`") from None
    return context


def _existing_file(path: Path) -> Path:
    if not path.is_file():
        raise ValueError(f"{path} does not exist")
    return path


class TlsSettings(Record):
    """The TLS settings the updater and the service share (a record mixin): a kit, or the three files."""

    kit: Path | None = setting(None, description="enrollment kit folder (`edgeloop fleet enroll`): device id, group, "
                               "broker, ingest URL, signing keys and TLS identity, unless set otherwise")
    tls_ca: Path | None = setting(None, check=_existing_file,
                                  description="fleet CA certificate: every fleet link over TLS, verified")
    tls_cert: Path | None = setting(None, check=_existing_file,
                                    description="this device's client certificate (mutual TLS)")
    tls_key: Path | None = setting(None, check=_existing_file, description="the private key of --tls-cert")

    def problems(self) -> Iterator[str]:
        yield from super().problems()
        if (self.tls_cert is None) != (self.tls_key is None):
            yield "tls_cert and tls_key go together"
        if self.tls_cert is not None and self.tls_ca is None:
            yield "tls_cert needs tls_ca (the CA the servers' certificates are verified against)"

    def client_tls(self) -> ClientTls | None:
        return ClientTls(self.tls_ca, self.tls_cert, self.tls_key) if self.tls_ca is not None else None


class PlainHttpRefused(ConfigError):
    """A device with TLS settings was asked, or redirected, to a plain ``http://`` URL."""


def require_https(url: str, what: str) -> None:
    """:class:`PlainHttpRefused` unless ``url`` is https: a device with TLS settings never downgrades."""
    if urlsplit(url).scheme != "https":
        raise PlainHttpRefused(f"{what} {url!r} is not https: this device uses TLS and never sends or fetches over "
                          "plain HTTP")


def http_client(tls: ClientTls | None, timeout_s: float, follow_redirects: bool = False):
    """An ``httpx.Client`` for the fleet's HTTP links. With ``tls``: verified against the fleet CA, the
    device's certificate presented, and every request (a redirect's too) refused unless it is https."""
    import httpx

    if tls is None:
        return httpx.Client(timeout=timeout_s, follow_redirects=follow_redirects)

    def https_only(request: httpx.Request) -> None:
        if request.url.scheme != "https":
            raise PlainHttpRefused(f"refused to send a request to {request.url} over plain HTTP: this device uses "
                                   "TLS and never downgrades")

    return httpx.Client(timeout=timeout_s, follow_redirects=follow_redirects, verify=tls.context(),
                        event_hooks={"request": [https_only]})


def kit_tls(root: Path) -> ClientTls:
    """Where a kit in ``root`` keeps its TLS files (the one statement of that layout: written and read by it)."""
    folder = Path(root) / "tls"
    return ClientTls(folder / "ca.crt", folder / "device.crt", folder / "device.key")


@dataclass(frozen=True)
class Kit:
    """An enrollment kit, read by :func:`load_kit`."""

    root: Path
    device_id: str
    group: str
    broker: str
    ingest_url: str | None
    serial: str
    device_class: str | None = None

    @property
    def tls(self) -> ClientTls:
        return kit_tls(self.root)

    @property
    def public_keys(self) -> Path:
        return self.root / "keys"

    def settings(self) -> dict[str, Any]:
        """The kit as settings of the updater and the service (each takes the ones it has)."""
        tls = self.tls
        return {"device_id": self.device_id, "group": self.group, "broker": self.broker,
                "public_keys": [str(self.public_keys)], "upload_to": self.ingest_url,
                "tls_ca": str(tls.ca), "tls_cert": str(tls.certificate), "tls_key": str(tls.key),
                **({"device_class": self.device_class} if self.device_class else {})}


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
    device_class = raw.get("device_class")
    kit = Kit(root, raw["device_id"], raw["group"], raw["broker"], raw.get("ingest_url"), str(raw.get("serial", "")),
              device_class if isinstance(device_class, str) else None)
    missing = [str(path) for path in (kit.tls.ca, kit.tls.certificate, kit.tls.key) if not path.is_file()]
    if missing or not any(kit.public_keys.glob("*.pub")):
        raise ConfigError(f"enrollment kit {root} is incomplete (missing {', '.join(missing) or 'keys/*.pub'}); "
                          "enroll the device again")
    return kit
