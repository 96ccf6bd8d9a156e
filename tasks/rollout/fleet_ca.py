"""The fleet's certificate authority: the CA every fleet link is authenticated with (``edgeloop fleet ca``).

One folder on the control plane (``rollout.fleet_ca_dir``, mode 0700) holds

- ``ca.key`` (0600) and ``ca.crt``: an ECDSA P-256 CA, valid ten years, that signs nothing but fleet
  certificates (path length 0);
- ``crl.pem``: the revocation list every TLS server of the fleet checks (broker, ingest/bundle
  service), re-signed on every enrollment and revocation and valid :data:`CRL_DAYS` days, so it never
  lapses while the CA is in use (an expired CRL locks out every device: ``edgeloop fleet ca crl``
  re-signs it);
- ``issued.json``: every certificate issued, by serial: its subject, kind, validity and revocation;
- ``servers/<name>.crt|.key``: the TLS servers' certificates (broker, ingest), with the host names
  and addresses devices reach them by;
- ``clients/control-plane.crt|.key``: the control plane's own client certificate (its broker login).

A device's certificate carries the device id as its common name, and the broker takes the id from it
(``use_identity_as_username``), so the per-device ACL binds to the certificate. An enrollment kit
(:func:`enroll`) is what one device needs: its key and certificate, the CA, the bundle-signing public
keys and where the broker and the ingest service are.

Every write is atomic and the folder is locked while it changes, so two operators at once cannot
issue the same serial or lose a revocation.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge.files import atomic_write_bytes, atomic_write_text
from edge.identity import DEVICE_ID_RULE, is_device_id
from edge.tls import KIT_FILE, kit_tls
from tasks.errors import ConfigError

CA_NAME = "edgeloop fleet CA"
CA_DAYS = 3650
SERVER_DAYS = 397        # what browsers accept for a server certificate; rotate with `fleet server-cert`
DEVICE_DAYS = 365
CRL_DAYS = 365
CONTROL_PLANE = "control-plane"
KIT_VERSION = 1


@dataclass(frozen=True)
class CertificatePair:
    """A certificate and its private key on disk."""

    certificate: Path
    key: Path


@dataclass(frozen=True)
class FleetCa:
    """The CA folder (see the module docstring); :func:`open_ca` checks it exists."""

    root: Path

    @property
    def key_path(self) -> Path:
        return self.root / "ca.key"

    @property
    def certificate_path(self) -> Path:
        return self.root / "ca.crt"

    @property
    def crl_path(self) -> Path:
        return self.root / "crl.pem"

    @property
    def issued_path(self) -> Path:
        return self.root / "issued.json"

    def server(self, name: str) -> CertificatePair:
        return CertificatePair(self.root / "servers" / f"{name}.crt", self.root / "servers" / f"{name}.key")

    @property
    def control_plane(self) -> CertificatePair:
        return CertificatePair(self.root / "clients" / f"{CONTROL_PLANE}.crt",
                               self.root / "clients" / f"{CONTROL_PLANE}.key")

    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.certificate_path.read_bytes())

    def issued(self) -> dict[str, dict]:
        """Serial (hex) -> what was issued; empty for a new CA."""
        if not self.issued_path.is_file():
            return {}
        try:
            return json.loads(self.issued_path.read_text())
        except (OSError, ValueError) as error:
            raise ConfigError(f"{self.issued_path} is unreadable ({error}); restore it from the control plane's "
                              "backup: without it revocations cannot be listed") from None

    def revoked_serials(self) -> set[int]:
        return {int(serial, 16) for serial, entry in self.issued().items() if entry.get("revoked_at")}


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_pair(pair: CertificatePair, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    atomic_write_bytes(pair.key, _key_pem(key))  # mkstemp: 0600 from the first byte
    atomic_write_bytes(pair.certificate, certificate.public_bytes(serialization.Encoding.PEM))
    pair.certificate.chmod(0o644)


@contextmanager
def _locked(root: Path) -> Iterator[None]:
    with open(root / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def open_ca(root: Path) -> FleetCa:
    """The CA in ``root``; :class:`ConfigError` saying how to create it when it is missing or incomplete."""
    ca = FleetCa(Path(root))
    missing = [path.name for path in (ca.key_path, ca.certificate_path, ca.crl_path) if not path.is_file()]
    if missing:
        raise ConfigError(f"no fleet CA in {root} (missing {', '.join(missing)}); create it with `edgeloop fleet "
                          f"ca init --ca-dir {root}`")
    if ca.key_path.stat().st_mode & 0o077:
        raise ConfigError(f"{ca.key_path} is readable by other users: chmod 600 it (and consider the CA exposed)")
    return ca


def init_ca(root: Path, name: str = CA_NAME, days: int = CA_DAYS) -> FleetCa:
    """Create the CA in ``root`` (refused when one is there: a new CA would lock out every enrolled device),
    its empty CRL and the control plane's client certificate."""
    root = Path(root)
    ca = FleetCa(root)
    if ca.key_path.exists() or ca.certificate_path.exists():
        raise ConfigError(f"{root} already holds a fleet CA; a new one would lock out every enrolled device. "
                          "Remove the folder first if that is really what you want")
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                         x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgeloop")])
    now = _now()
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False,
                                                key_encipherment=False, data_encipherment=False,
                                                key_agreement=False, key_cert_sign=True, crl_sign=True,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                   .sign(key, hashes.SHA256()))
    with _locked(root):
        _write_pair(CertificatePair(ca.certificate_path, ca.key_path), certificate, key)
        _write_crl(ca, key, certificate)
    issue_client(ca, CONTROL_PLANE, ca.control_plane, kind="control-plane")
    return ca


def _signer(ca: FleetCa) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = serialization.load_pem_private_key(ca.key_path.read_bytes(), password=None)
    return key, ca.certificate()  # type: ignore[return-value]


def _write_crl(ca: FleetCa, key: ec.EllipticCurvePrivateKey, certificate: x509.Certificate) -> None:
    now = _now()
    builder = (x509.CertificateRevocationListBuilder().issuer_name(certificate.subject)
               .last_update(now - dt.timedelta(minutes=5)).next_update(now + dt.timedelta(days=CRL_DAYS))
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False))
    for serial, entry in sorted(ca.issued().items()):
        if entry.get("revoked_at"):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(serial, 16))
                .revocation_date(dt.datetime.fromisoformat(entry["revoked_at"])).build())
    crl = builder.sign(key, hashes.SHA256())
    atomic_write_bytes(ca.crl_path, crl.public_bytes(serialization.Encoding.PEM))
    ca.crl_path.chmod(0o644)


def resign_crl(ca: FleetCa) -> Path:
    """Sign the revocation list again (a fresh validity window), same entries; returns its path."""
    with _locked(ca.root):
        _write_crl(ca, *_signer(ca))
    return ca.crl_path


def _build(ca_key: ec.EllipticCurvePrivateKey, ca_certificate: x509.Certificate, subject: str,
           usage: x509.ObjectIdentifier, alt_names: list[x509.GeneralName], not_before: dt.datetime | None,
           not_after: dt.datetime | None, days: int) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _new_key()
    now = _now()
    not_before = not_before or now - dt.timedelta(minutes=5)
    not_after = min(not_after or now + dt.timedelta(days=days), ca_certificate.not_valid_after_utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(ca_certificate.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=True, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False))
    if alt_names:
        builder = builder.add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _record(ca: FleetCa, issued_now: list[tuple[x509.Certificate, str, str]], ca_key: ec.EllipticCurvePrivateKey,
            ca_certificate: x509.Certificate) -> None:
    """Add (certificate, subject, kind) entries to ``issued.json`` and re-sign the CRL; call under the lock."""
    issued, now = ca.issued(), _now().isoformat()
    for certificate, subject, kind in issued_now:
        issued[format(certificate.serial_number, "x")] = {
            "subject": subject, "kind": kind, "not_before": certificate.not_valid_before_utc.isoformat(),
            "not_after": certificate.not_valid_after_utc.isoformat(), "issued_at": now, "revoked_at": None}
    atomic_write_text(ca.issued_path, json.dumps(issued, indent=1, sort_keys=True) + "\n")
    _write_crl(ca, ca_key, ca_certificate)


def _issue(ca: FleetCa, subject: str, kind: str, pair: CertificatePair, usage: x509.ObjectIdentifier,
           alt_names: list[x509.GeneralName], not_before: dt.datetime | None, not_after: dt.datetime | None,
           days: int) -> x509.Certificate:
    ca_key, ca_certificate = _signer(ca)
    certificate, key = _build(ca_key, ca_certificate, subject, usage, alt_names, not_before, not_after, days)
    with _locked(ca.root):
        _record(ca, [(certificate, subject, kind)], ca_key, ca_certificate)
        _write_pair(pair, certificate, key)
    return certificate


def issue_client(ca: FleetCa, subject: str, pair: CertificatePair, *, kind: str = "device",
                 not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
                 days: int = DEVICE_DAYS) -> x509.Certificate:
    """A client certificate whose common name is ``subject`` (a device id, or the control plane)."""
    return _issue(ca, subject, kind, pair, ExtendedKeyUsageOID.CLIENT_AUTH, [], not_before, not_after, days)


def issue_clients(ca: FleetCa, subjects: list[str], folder: Path,
                  days: int = DEVICE_DAYS) -> dict[str, CertificatePair]:
    """Client certificates for many devices at once (a simulated fleet, a factory batch): one key and certificate
    per device in ``folder`` (``<id>.crt``, ``<id>.key``), recorded and the CRL signed once for the batch."""
    bad = [subject for subject in subjects if not is_device_id(subject) or subject == CONTROL_PLANE]
    if bad:
        raise ConfigError(f"device ids not allowed: {', '.join(bad[:5])} ({DEVICE_ID_RULE})")
    ca_key, ca_certificate = _signer(ca)
    built = {subject: _build(ca_key, ca_certificate, subject, ExtendedKeyUsageOID.CLIENT_AUTH, [], None, None, days)
             for subject in subjects}
    pairs = {subject: CertificatePair(folder / f"{subject}.crt", folder / f"{subject}.key") for subject in subjects}
    with _locked(ca.root):
        _record(ca, [(certificate, subject, "device") for subject, (certificate, _) in built.items()], ca_key,
                ca_certificate)
        for subject, (certificate, key) in built.items():
            _write_pair(pairs[subject], certificate, key)
    return pairs


def _alt_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not host or any(character.isspace() or character in "/:@" for character in host):
        raise ConfigError(f"server host {host!r} is neither an IP address nor a DNS name")
    return x509.DNSName(host)


def issue_server(ca: FleetCa, name: str, hosts: list[str], days: int = SERVER_DAYS) -> CertificatePair:
    """The TLS certificate of server ``name`` (``broker``, ``ingest``) for the names and addresses in ``hosts``
    (what devices connect to: a certificate that does not name the host is refused by them). Replaces
    the previous one: that is the rotation; restart or signal the server to load it."""
    if not is_device_id(name):
        raise ConfigError(f"server name {name!r} is not allowed: {DEVICE_ID_RULE}")
    if not hosts:
        raise ConfigError(f"the {name} certificate needs at least one host name or address devices reach it by")
    if days < 1:
        raise ConfigError(f"a server certificate must be valid at least a day, not {days}")
    alt_names = [_alt_name(host) for host in hosts]
    pair = ca.server(name)
    _issue(ca, name, "server", pair, ExtendedKeyUsageOID.SERVER_AUTH, alt_names, None, None, days)
    return pair


def revoke(ca: FleetCa, subject: str, *, keep_newest: bool = False) -> list[str]:
    """Revoke every certificate of ``subject`` (``keep_newest``: all but the newest, after a rotation) and
    re-sign the CRL; returns the revoked serials. Servers must reload the CRL to refuse them."""
    with _locked(ca.root):
        issued = ca.issued()
        live = sorted((entry["issued_at"], serial) for serial, entry in issued.items()
                      if entry["subject"] == subject and not entry.get("revoked_at"))
        if not live and not any(entry["subject"] == subject for entry in issued.values()):
            raise ConfigError(f"no certificate was issued to {subject!r} by the CA in {ca.root}")
        chosen = [serial for _, serial in (live[:-1] if keep_newest else live)]
        now = _now().isoformat()
        for serial in chosen:
            issued[serial]["revoked_at"] = now
        atomic_write_text(ca.issued_path, json.dumps(issued, indent=1, sort_keys=True) + "\n")
        _write_crl(ca, *_signer(ca))
    return chosen


def enroll(ca: FleetCa, device: str, group: str, kit_dir: Path, *, broker: str, ingest_url: str | None,
           public_keys: list[Path], not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
           days: int = DEVICE_DAYS, device_class: str | None = None) -> Path:
    """Write ``device``'s enrollment kit into ``kit_dir`` (the layout :mod:`edge.tls` reads); returns the kit's folder.

    The kit is built beside ``kit_dir`` and renamed into place, so a failure leaves no half kit; an
    existing kit is replaced (re-enrollment rotates the device's key: revoke the old certificate with
    ``edgeloop fleet revoke DEVICE --superseded`` once the device runs the new one).
    """
    if not is_device_id(device) or device == CONTROL_PLANE:
        raise ConfigError(f"device id {device!r} is not allowed: {DEVICE_ID_RULE}, and not {CONTROL_PLANE!r}")
    if not re.fullmatch(r"[^\s:/@]+:\d{1,5}", broker) or not 1 <= int(broker.rpartition(":")[2]) <= 65535:
        raise ConfigError(f"broker {broker!r} is not HOST:PORT (the broker's TLS listener, e.g. broker.example:8883)")
    if days < 1:
        raise ConfigError(f"a device certificate must be valid at least a day, not {days}")
    if ingest_url is not None and not ingest_url.startswith("https://"):
        raise ConfigError(f"ingest URL {ingest_url!r}: a kit only names https:// endpoints (devices never send "
                          "samples in the clear)")
    keys = [key for path in map(Path, public_keys) for key in (sorted(path.glob("*.pub")) if path.is_dir() else [path])]
    unreadable = [str(path) for path in keys if not path.is_file()]
    if not keys or unreadable:
        raise ConfigError(f"bundle-signing public keys missing: {', '.join(unreadable) or 'none given'}; "
                          "`edgeloop keys generate` makes the pair")
    kit_dir = Path(kit_dir)
    staging = kit_dir.with_name(f".{kit_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    files = kit_tls(staging)
    files.ca.parent.mkdir(parents=True)
    (staging / "keys").mkdir()
    staging.chmod(0o700)
    try:
        certificate = issue_client(ca, device, CertificatePair(files.certificate, files.key),
                                   not_before=not_before, not_after=not_after, days=days)
        shutil.copyfile(ca.certificate_path, files.ca)
        for path in keys:
            shutil.copyfile(path, staging / "keys" / path.name)
        atomic_write_text(staging / KIT_FILE, json.dumps({
            "version": KIT_VERSION, "device_id": device, "group": group, "broker": broker, "ingest_url": ingest_url,
            **({"device_class": device_class} if device_class else {}),
            "serial": format(certificate.serial_number, "x"),
            "not_after": certificate.not_valid_after_utc.isoformat()}, indent=1) + "\n")
        (staging / KIT_FILE).chmod(0o644)
        if kit_dir.exists():
            shutil.rmtree(kit_dir)
        os.replace(staging, kit_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return kit_dir

