"""Mutual TLS for the control plane's HTTP endpoint devices talk to (ingest, bundles), served by uvicorn.

- :func:`server_context`: TLS 1.2+, the server certificate ``edgeloop fleet server-cert ingest`` wrote, a
  client certificate from the fleet CA required and checked against the CRL at the handshake;
- :class:`CertificateIdentity`: uvicorn's HTTP protocol, plus the ASGI TLS extension
  (``scope["extensions"]["tls"]``: ``client_cert_name``, the verified certificate's common name, and its
  serial), which uvicorn does not fill in itself, so a route knows which device it talks to;
- :class:`RevocationList`: the CRL, re-read when the file changes, so a device revoked while the server
  runs is refused at its next request (the handshake's copy is only the one loaded at start).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import threading
from pathlib import Path
from typing import Any

from cryptography import x509
from uvicorn.protocols.http.h11_impl import H11Protocol

from tasks.errors import ConfigError
from tasks.rollout.fleet_ca import FleetCa, open_ca

LOGGER = logging.getLogger(__name__)
SERVER_NAME = "ingest"  # the certificate `edgeloop fleet server-cert ingest --host ...` writes


def server_context(ca: FleetCa, name: str = SERVER_NAME) -> ssl.SSLContext:
    """The TLS context of the device endpoint (see the module docstring)."""
    pair = ca.server(name)
    if not pair.certificate.is_file() or not pair.key.is_file():
        raise ConfigError(f"no {name} certificate in {ca.root}/servers; issue it with `edgeloop fleet server-cert "
                          f"{name} --host NAME_DEVICES_USE`")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(pair.certificate, pair.key)
    context.load_verify_locations(cafile=str(ca.certificate_path))
    context.load_verify_locations(cafile=str(ca.crl_path))
    context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    context.verify_mode = ssl.CERT_REQUIRED
    return context


def peer_identity(transport: asyncio.BaseTransport) -> dict[str, Any] | None:
    """The verified client certificate's common name and serial, or None on a plain connection."""
    der = None
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is not None:
        der = ssl_object.getpeercert(binary_form=True)
    if not der:
        return None
    certificate = x509.load_der_x509_certificate(der)
    names = certificate.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return {"client_cert_name": str(names[0].value) if names else None, "client_cert_serial": certificate.serial_number}


class CertificateIdentity(H11Protocol):
    """uvicorn's h11 protocol that hands the client certificate's identity to the app (ASGI TLS extension)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        identity = peer_identity(transport)
        if identity is not None:
            inner = self.app

            async def with_identity(scope, receive, send):
                scope.setdefault("extensions", {})["tls"] = identity
                return await inner(scope, receive, send)

            self.app = with_identity


class RevocationList:
    """The fleet CA's CRL as a set of serials, re-read when its mtime or size changes; a CRL that does not
    parse or verify keeps the previous one (and says so), so a bad copy cannot un-revoke anyone."""

    def __init__(self, ca_dir: Path) -> None:
        self.ca = open_ca(ca_dir)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._serials: frozenset[int] = frozenset()
        self._load()

    def _load(self) -> None:
        stat = self.ca.crl_path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        crl = x509.load_pem_x509_crl(self.ca.crl_path.read_bytes())
        if not crl.is_signature_valid(self.ca.certificate().public_key()):
            raise ConfigError(f"{self.ca.crl_path} is not signed by the fleet CA")
        self._serials = frozenset(entry.serial_number for entry in crl)
        self._stamp = stamp

    def is_revoked(self, serial: int) -> bool:
        with self._lock:
            try:
                self._load()
            except (OSError, ValueError, ConfigError) as error:
                LOGGER.error("keeping the previous revocation list: %s", error)
            return serial in self._serials
