"""What the fleet's Mosquitto broker reads: its configuration, one text for every broker the project runs,
and its password file format (:mod:`tasks.rollout.fleet` writes the files for the fleet).

The local broker (:func:`tasks.stack.mosquitto.start_mosquitto`: tests, the demo, the benchmark) and the
compose stack's (``docker/mosquitto.conf``, checked against :func:`compose_config` by a unit test) share
:func:`security_settings`, so they cannot drift apart. Those settings

- bind identity: no anonymous clients, the password file and ACL of :mod:`tasks.rollout.fleet`, and
  ``use_username_as_clientid``: the broker replaces every client id with the login's user name, so a
  device that connects as ``edgeloop-control-plane`` or as another device's id only ever gets its own
  session and cannot disconnect anyone else (two connections with one login still do: one login, one
  connection);
- on a TLS listener (:func:`tls_listener_settings`: the fleet's production setting), authenticate by
  certificate only: a client certificate from the fleet CA is required, checked against the CRL, and
  its common name is the login (``use_identity_as_username``), so the ACL binds to the certificate and
  no password file is read; TLS 1.2 is the oldest version accepted;
- bound what one client can cost: a packet over :data:`MAX_PACKET_BYTES` (a payload over the largest fleet
  message, a signed manifest of :data:`edge.rollout.MAX_MESSAGE_BYTES`, plus room for its topic) is never
  forwarded nor retained and costs its sender the connection; each client's QoS 1 queue and in-flight
  window are capped. (Mosquitto 2.0 treats ``message_size_limit`` the same way for MQTT v5 clients and
  recommends ``max_packet_size``, which holds for every protocol version.)
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from edge.rollout import MAX_MESSAGE_BYTES
from tasks.errors import ConfigError

PASSWORD_FILE = "mosquitto.passwd"
ACL_FILE = "mosquitto.acl"
DEFAULT_ITERATIONS = 101  # what mosquitto_passwd 2.0 uses; simulated fleets may pass fewer
SALT_BYTES = 12           # as mosquitto_passwd

PACKET_OVERHEAD_BYTES = 1024  # fixed header, a topic of two 64-character levels, MQTT v5 properties
MAX_PACKET_BYTES = MAX_MESSAGE_BYTES + PACKET_OVERHEAD_BYTES
MAX_QUEUED_MESSAGES = 1_000_000  # per client: a control plane that was away while 10,000 devices reported
MAX_QUEUED_BYTES = 256 * 2**20   # and at most this much of it, whatever the messages' size
MAX_INFLIGHT_MESSAGES = 20       # QoS 1 messages on their way to one client before its acknowledgements

# where the compose stack's broker finds its files (docker/compose.control-plane.yml mounts them there)
COMPOSE_CONFIG = Path(__file__).resolve().parents[2] / "docker" / "mosquitto.conf"
COMPOSE_CREDENTIALS = "/mosquitto/credentials"
COMPOSE_DATA = "/mosquitto/data/"


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS listener reads: the fleet CA, the broker's certificate and key, the CRL."""

    ca: Path
    certificate: Path
    key: Path
    crl: Path


def tls_listener_settings(files: TlsFiles) -> list[str]:
    """The lines after a ``listener`` line that make it mutual TLS with certificate identities."""
    return [f"cafile {files.ca}", f"certfile {files.certificate}", f"keyfile {files.key}", f"crlfile {files.crl}",
            "require_certificate true", "use_identity_as_username true", "tls_version tlsv1.2"]


def security_settings(password_file: str | None, acl_file: str,
                      max_queued_messages: int = MAX_QUEUED_MESSAGES) -> list[str]:
    """The lines that bind identity and bound each client (see the module docstring); no password file for a
    broker whose only listener takes identities from certificates."""
    passwords = [f"password_file {password_file}"] if password_file else []
    return ["allow_anonymous false", *passwords, f"acl_file {acl_file}",
            "use_username_as_clientid true", f"max_packet_size {MAX_PACKET_BYTES}",
            f"max_queued_messages {max_queued_messages}",
            f"max_queued_bytes {MAX_QUEUED_BYTES}", f"max_inflight_messages {MAX_INFLIGHT_MESSAGES}"]


# what the compose stack's copier puts in COMPOSE_CREDENTIALS: the ACL and, from the fleet CA, these files
COMPOSE_TLS = TlsFiles(Path(COMPOSE_CREDENTIALS) / "ca.crt", Path(COMPOSE_CREDENTIALS) / "broker.crt",
                       Path(COMPOSE_CREDENTIALS) / "broker.key", Path(COMPOSE_CREDENTIALS) / "crl.pem")
COMPOSE_TLS_PORT = 8883


def compose_config() -> str:
    """What ``docker/mosquitto.conf`` holds: the one mutual-TLS listener (:func:`tls_listener_settings`),
    persistence, and :func:`security_settings` with the ACL ``edgeloop fleet`` writes, as the compose stack
    mounts them. No plain listener and no password file: outside the demo, certificates are the logins."""
    lines = ["# The fleet's MQTT broker in the compose stack. Generated from tasks/rollout/broker.py",
             "# (a unit test keeps them equal): edit that module, not this file.",
             f"listener {COMPOSE_TLS_PORT}", *tls_listener_settings(COMPOSE_TLS),
             *security_settings(None, f"{COMPOSE_CREDENTIALS}/{ACL_FILE}"),
             "persistence true", f"persistence_location {COMPOSE_DATA}"]
    return "\n".join(lines) + "\n"


def hash_password(password: str, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Mosquitto 2's PBKDF2-SHA512 entry, ``$7$<iterations>$<salt b64>$<hash b64>``, as mosquitto_passwd writes it
    (the same hash in Python: thousands per second instead of one process per device)."""
    if iterations < 1:
        raise ConfigError(f"PBKDF2 iterations must be at least 1, got {iterations}")
    salt = os.urandom(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def verify_password(password: str, hashed: str) -> bool:
    """True when ``hashed`` (a ``$7$`` entry) is the hash of ``password``."""
    try:
        _, kind, iterations, salt, digest = hashed.split("$")
        expected = base64.b64decode(digest, validate=True)
        actual = hashlib.pbkdf2_hmac("sha512", password.encode(), base64.b64decode(salt, validate=True),
                                     int(iterations))
    except ValueError:
        return False
    return kind == "7" and hmac.compare_digest(expected, actual)


def read_password_file(path: Path) -> dict[str, str]:
    """User -> hash from a Mosquitto password file; empty when there is none yet."""
    if not path.is_file():
        return {}
    hashes = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        user, _, hashed = line.partition(":")
        if not line.strip():
            continue
        if not user or not hashed.startswith("$"):
            raise ConfigError(f"{path} line {number} is not 'user:$hash'; regenerate it with `edgeloop fleet "
                              "broker-files` after re-issuing the broken device's password")
        hashes[user] = hashed
    return hashes
