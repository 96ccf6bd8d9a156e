"""The fleet inventory (which device is in which group) and its MQTT broker credentials; the commands are
in :mod:`tasks.rollout.fleet_cli` (``edgeloop fleet``).

A fleet on the demo's password logins gets its devices with :func:`add_device`; a fleet on mutual TLS
with :func:`enroll_device` (a certificate from the fleet CA, :mod:`tasks.rollout.fleet_ca`, instead of a
password) and loses them with :func:`revoke_device`. Both kinds share the fleet file and the ACL.

The fleet file is YAML: ``{devices: {<device id>: {group: <group>, class: <device class>}}}``; the class (a
``devices.yaml`` name, optional) decides which variant a per-class release sends the device.
The credentials folder holds
what Mosquitto reads (``mosquitto.passwd``: PBKDF2-SHA512 hashes in Mosquitto 2's ``$7$`` format;
``mosquitto.acl``) and the control plane's own password (``control-plane.password``), all mode 0600.
A device's password is printed once by ``add-device``; only its hash is kept.

The ACL gives each device exactly the topics of :mod:`edge.rollout`: it reads its group's model topic
and writes its own status and telemetry topics. Only the ``control-plane`` user may publish manifests.
Signal a running broker (``tasks.stack.mosquitto.reload_mosquitto``) after a change.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from edge.files import atomic_write_text
from edge.identity import DEVICE_ID_RULE, is_device_id
from edge.rollout import DEVICE_CLASS, GROUP, model_topic, status_topic, telemetry_topic
from edge.tls import ClientTls
from tasks.config import format_validation_error
from tasks.errors import ConfigError
from tasks.rollout.broker import (  # re-exported: the fleet's broker files are named and written from here
    ACL_FILE,
    DEFAULT_ITERATIONS,
    PASSWORD_FILE,
    hash_password,
    read_password_file,
    verify_password,
)

LOGGER = logging.getLogger(__name__)
CONTROL_PLANE_USER = "control-plane"
CONTROL_PLANE_PASSWORD_FILE = "control-plane.password"


def _device_id(device: str) -> str:
    if not is_device_id(device):
        raise ValueError(f"not allowed: a device id is {DEVICE_ID_RULE} (it is an MQTT topic level, the device's "
                         "broker user name and client id)")
    if device == CONTROL_PLANE_USER:
        raise ValueError(f"{CONTROL_PLANE_USER!r} is the control plane's broker user, not a device id")
    return device


def _group(group: str) -> str:
    if not GROUP.fullmatch(group):
        raise ValueError("a group is 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
                         "(it is an MQTT topic level)")
    return group


def _check(value: str, check: Callable[[str], str], what: str) -> None:
    try:
        check(value)
    except ValueError as error:
        raise ConfigError(f"{what} {value!r}: {error}") from None


DeviceId = Annotated[str, AfterValidator(_device_id)]
GroupName = Annotated[str, AfterValidator(_group)]


def _device_class(name: str) -> str:
    if len(name) > 64 or not DEVICE_CLASS.fullmatch(name):
        raise ValueError("a device class is its devices.yaml name: lowercase letters, digits and single hyphens")
    return name


DeviceClass = Annotated[str, AfterValidator(_device_class)]


class FleetDevice(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    group: GroupName
    device_class: DeviceClass | None = Field(None, alias="class")


class Fleet(BaseModel):
    """Every device of the fleet and its group."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    devices: dict[DeviceId, FleetDevice] = Field(default_factory=dict)

    def groups(self) -> dict[str, list[str]]:
        """Group -> its devices, both sorted."""
        members: dict[str, list[str]] = {}
        for device in sorted(self.devices):
            members.setdefault(self.devices[device].group, []).append(device)
        return dict(sorted(members.items()))

    def classes(self, group: str) -> dict[str, str | None]:
        """The devices of ``group`` and their device class (None: not given)."""
        return {device: entry.device_class for device, entry in sorted(self.devices.items()) if entry.group == group}


def parse_fleet(raw: object, source: str) -> Fleet:
    """Validate a parsed fleet mapping; :class:`ConfigError` names each bad key and value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"fleet file {source} must be a mapping with a 'devices' key, got {type(raw).__name__}")
    try:
        return Fleet.model_validate(raw)
    except ValidationError as error:
        message = format_validation_error(error, source).replace("invalid parameters", "invalid fleet file", 1)
        raise ConfigError(message.replace("allowed keys are listed in params.yaml",
                                          "allowed: devices.<device id>.group and .class")) from None


def load_fleet(path: Path) -> Fleet:
    """The fleet in ``path`` (YAML), validated."""
    if not path.is_file():
        raise ConfigError(f"fleet file {path} not found; add a device with `edgeloop fleet add-device DEVICE "
                          f"--group GROUP --fleet {path} --credentials DIR`")
    try:
        raw = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"fleet file {path} is not readable YAML: {error}") from None
    return parse_fleet(raw, str(path))


def _raw(fleet: Fleet) -> dict[str, dict[str, str]]:
    return {device: _entry(entry.group, entry.device_class) for device, entry in fleet.devices.items()}


def save_fleet(fleet: Fleet, path: Path) -> None:
    raw = {"devices": dict(sorted(_raw(fleet).items()))}
    atomic_write_text(path, yaml.dump(raw, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper),
                                      default_flow_style=None, sort_keys=True))
    path.chmod(0o644)  # an inventory, not a secret: services running as other users read it


def acl_text(fleet: Fleet) -> str:
    """The Mosquitto ACL: the control plane reads and writes ``fleet/#``; each device only its own topics."""
    lines = ["# generated by `edgeloop fleet` from the fleet file: edit the fleet, not this file",
             f"user {CONTROL_PLANE_USER}", "topic readwrite fleet/#", ""]
    for device, entry in sorted(fleet.devices.items()):
        lines += [f"user {device}", f"topic read {model_topic(entry.group)}",
                  f"topic write {status_topic(entry.group, device)}",
                  f"topic write {telemetry_topic(entry.group, device)}", ""]
    return "\n".join(lines)


def ensure_control_plane(credentials_dir: Path) -> str:
    """The control plane's broker password, created (mode 0600) on first use."""
    path = credentials_dir / CONTROL_PLANE_PASSWORD_FILE
    if path.is_file():
        password = path.read_text().strip()
        if password:
            return password
    password = secrets.token_urlsafe(32)
    atomic_write_text(path, password + "\n")  # mkstemp: mode 0600 from the first byte, kept by the rename
    return password


def control_plane_tls(ca_dir: Path) -> ClientTls:
    """The control plane's broker identity on a mutual-TLS broker: its certificate from the fleet CA."""
    from tasks.rollout import fleet_ca

    ca = fleet_ca.open_ca(ca_dir)
    return ClientTls(ca.certificate_path, ca.control_plane.certificate, ca.control_plane.key)


def _new_password() -> str:
    return secrets.token_urlsafe(24)


def _write_broker_files(fleet: Fleet, credentials_dir: Path, hashes: dict[str, str],
                        iterations: int) -> tuple[Path, Path]:
    password_file, acl_file = credentials_dir / PASSWORD_FILE, credentials_dir / ACL_FILE
    missing = sorted(set(fleet.devices) - set(hashes))
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"no broker password for {shown} in {password_file}; issue one with `edgeloop fleet "
                          "add-device DEVICE --group GROUP --replace`")
    control_plane = ensure_control_plane(credentials_dir)
    known = hashes.get(CONTROL_PLANE_USER, "")
    entries = {CONTROL_PLANE_USER: known if verify_password(control_plane, known)
               else hash_password(control_plane, iterations)}
    entries |= {device: hashes[device] for device in sorted(fleet.devices)}
    atomic_write_text(password_file, "".join(f"{user}:{hashed}\n" for user, hashed in entries.items()))
    atomic_write_text(acl_file, acl_text(fleet))
    return password_file, acl_file


def write_acl(fleet: Fleet, credentials_dir: Path) -> Path:
    """Write the ACL for ``fleet`` alone (mode 0600): all a broker whose logins are certificates reads."""
    acl_file = credentials_dir / ACL_FILE
    atomic_write_text(acl_file, acl_text(fleet))
    return acl_file


def write_broker_files(fleet: Fleet, credentials_dir: Path, iterations: int = DEFAULT_ITERATIONS,
                       tls: bool = False) -> tuple[Path, ...]:
    """Write Mosquitto's password file and ACL for ``fleet`` (mode 0600); returns their paths. With ``tls``
    (certificates are the logins) only the ACL.

    Device hashes come from the existing password file (devices no longer in the fleet are dropped);
    the control plane's entry is made from its stored password.
    """
    if tls:
        return (write_acl(fleet, credentials_dir),)
    return _write_broker_files(fleet, credentials_dir, read_password_file(credentials_dir / PASSWORD_FILE),
                               iterations)


def _entry(group: str, device_class: str | None) -> dict[str, str]:
    return {"group": group, **({"class": device_class} if device_class else {})}


def add_device(fleet_file: Path, credentials_dir: Path, device: str, group: str, replace: bool = False,
               iterations: int = DEFAULT_ITERATIONS, device_class: str | None = None) -> str:
    """Put ``device`` in ``group`` with a new broker password; returns the password (only its hash is kept).

    ``replace`` re-issues the password of a known device (the old one stops working) and may move it
    to another group. The broker files are rewritten: reload the broker to apply them.
    """
    _check(device, _device_id, "device id")
    _check(group, _group, "group")
    fleet = load_fleet(fleet_file) if fleet_file.is_file() else Fleet()
    if device in fleet.devices and not replace:
        raise ConfigError(f"device {device!r} is already in {fleet_file} (group {fleet.devices[device].group}); "
                          "pass --replace to issue a new password (the old one stops working)")
    updated = parse_fleet({"devices": {**_raw(fleet), device: _entry(group, device_class)}}, f"device {device!r}")
    password = _new_password()
    hashes = read_password_file(credentials_dir / PASSWORD_FILE) | {device: hash_password(password, iterations)}
    _write_broker_files(updated, credentials_dir, hashes, iterations)  # first: a crash leaves no hashless device
    save_fleet(updated, fleet_file)
    return password


def remove_device(fleet_file: Path, credentials_dir: Path, device: str, tls: bool = False) -> None:
    """Take ``device`` out of the fleet and the broker files; it can no longer connect once the broker reloads."""
    fleet = load_fleet(fleet_file)
    if device not in fleet.devices:
        raise ConfigError(f"device {device!r} is not in {fleet_file}; `edgeloop fleet list --fleet {fleet_file}` "
                          "shows the devices")
    updated = Fleet(devices={name: entry for name, entry in fleet.devices.items() if name != device})
    save_fleet(updated, fleet_file)  # first: a crash leaves a stale hash that the next write drops
    write_broker_files(updated, credentials_dir, tls=tls)


def enroll_device(fleet_file: Path, credentials_dir: Path, ca_dir: Path, device: str, group: str, kit_dir: Path, *,
                  broker: str, ingest_url: str | None, public_keys: list[Path], days: int | None = None,
                  device_class: str | None = None) -> Path:
    """Put ``device`` in ``group`` of a mutual-TLS fleet: its enrollment kit (a new certificate and key, the
    CA, the signing keys, where to connect) written to ``kit_dir``, the fleet file and the ACL updated.
    Enrolling a device again rotates its key (and may move it to another group). Returns the kit."""
    from tasks.rollout import fleet_ca

    _check(device, _device_id, "device id")
    _check(group, _group, "group")
    ca = fleet_ca.open_ca(ca_dir)
    fleet = load_fleet(fleet_file) if fleet_file.is_file() else Fleet()
    updated = parse_fleet({"devices": {**_raw(fleet), device: _entry(group, device_class)}}, f"device {device!r}")
    validity = {"days": days} if days is not None else {}
    kit = fleet_ca.enroll(ca, device, group, kit_dir, broker=broker, ingest_url=ingest_url,
                          public_keys=public_keys, device_class=device_class, **validity)
    write_acl(updated, credentials_dir)
    save_fleet(updated, fleet_file)
    return kit


def revoke_device(fleet_file: Path, credentials_dir: Path, ca_dir: Path, device: str,
                  superseded_only: bool = False) -> list[str]:
    """Revoke ``device``'s certificates (the CRL re-signed) and take it out of the fleet and the ACL, so
    even a session still open loses its topics once the broker reloads; ``superseded_only`` (after a
    re-enrollment) revokes all but its newest certificate and keeps it in the fleet. Returns the serials."""
    from tasks.rollout import fleet_ca

    serials = fleet_ca.revoke(fleet_ca.open_ca(ca_dir), device, keep_newest=superseded_only)
    if not superseded_only and fleet_file.is_file() and device in load_fleet(fleet_file).devices:
        remove_device(fleet_file, credentials_dir, device, tls=True)
    return serials


def simulated_fleet(n: int, groups: Iterable[str], credentials_dir: Path, iterations: int = DEFAULT_ITERATIONS,
                    *, fleet_file: Path | None = None, prefix: str = "sim",
                    classes: Iterable[str] = ()) -> dict[str, tuple[str, str]]:
    """A fleet of ``n`` simulated devices spread round-robin over ``groups`` (and over device ``classes``, when
    given), written with its broker files.

    Replaces ``fleet_file`` (default ``credentials_dir/fleet.yaml``). Returns device -> (group, plaintext
    password) for the simulator; the files keep only hashes. Few ``iterations`` make 10,000 devices cheap
    to hash and to connect.
    """
    groups, classes = list(groups), list(classes)
    if n < 1 or not groups:
        raise ConfigError(f"a simulated fleet needs at least one device and one group, got {n} and {groups}")
    width = len(str(n - 1))
    devices = {f"{prefix}-{index:0{width}d}": groups[index % len(groups)] for index in range(n)}
    fleet = parse_fleet({"devices": {device: _entry(group, classes[index % len(classes)] if classes else None)
                                     for index, (device, group) in enumerate(devices.items())}}, "simulated fleet")
    passwords = {device: _new_password() for device in devices}
    hashes = {device: hash_password(password, iterations) for device, password in passwords.items()}
    _write_broker_files(fleet, credentials_dir, hashes, iterations)
    save_fleet(fleet, fleet_file or credentials_dir / "fleet.yaml")
    return {device: (group, passwords[device]) for device, group in devices.items()}
