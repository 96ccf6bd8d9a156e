"""The fleet inventory and its broker credentials (tasks/rollout/fleet.py), without a broker.

That Mosquitto accepts these hashes and enforces this ACL is tests/integration/test_mqtt_security.py.
"""

from __future__ import annotations

import base64
import stat

import pytest
import yaml

from edge.identity import DEVICE_ID_RULE
from tasks.errors import ConfigError
from tasks.rollout import fleet_cli
from tasks.rollout.fleet import (
    ACL_FILE,
    CONTROL_PLANE_PASSWORD_FILE,
    CONTROL_PLANE_USER,
    PASSWORD_FILE,
    Fleet,
    acl_text,
    add_device,
    ensure_control_plane,
    hash_password,
    load_fleet,
    parse_fleet,
    read_password_file,
    remove_device,
    simulated_fleet,
    verify_password,
    write_broker_files,
)

# written by Mosquitto 2.0.11's own `mosquitto_passwd -b pw alice secret`
MOSQUITTO_PASSWD_ENTRY = ("$7$101$DPsMckCWjgsHHBhJ$WZSw3zIF3noEHC9UYpJmD+Slf8Ub5Fp4hOl9U90PgOkaKD1hveKJB3cvUkkfayrf"
                          "jGozGRwTKsp3qGcTBaZt2A==")


def _mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(("raw", "expected"), [
    ({"devices": {"dev/1": {"group": "a"}}}, "devices.dev/1"),
    ({"devices": {"dev-1": {"group": "a/b"}}}, "devices.dev-1.group: got 'a/b'"),
    ({"devices": {"dev-1": {"group": "#"}}}, "devices.dev-1.group: got '#'"),
    ({"devices": {"dev-1": {}}}, "devices.dev-1.group: got (missing)"),
    ({"devices": {"dev-1": {"group": "a", "colour": "red"}}}, "devices.dev-1.colour: unknown key"),
    ({"devices": {"control-plane": {"group": "a"}}}, "the control plane's broker user"),
    ({"devices": {"x" * 65: {"group": "a"}}}, "1-64 letters"),
    ({"machines": {}}, "machines: unknown key"),
    (["dev-1"], "must be a mapping with a 'devices' key"),
])
def test_bad_fleet_files_name_the_key_and_value(raw, expected):
    with pytest.raises(ConfigError, match="fleet") as caught:
        parse_fleet(raw, "fleet.yaml")
    assert expected in str(caught.value)


def test_a_fleet_file_loads_and_groups_its_devices(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text("devices:\n  b-2: {group: south}\n  a-1: {group: north}\n  a-3: {group: north}\n")
    fleet = load_fleet(path)
    assert fleet.groups() == {"north": ["a-1", "a-3"], "south": ["b-2"]}
    assert load_fleet(_empty(tmp_path)).devices == {}


def _empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("")
    return path


def test_a_missing_or_broken_fleet_file_says_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match="not found; add a device with `edgeloop fleet add-device"):
        load_fleet(tmp_path / "absent.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("devices: {a: [\n")
    with pytest.raises(ConfigError, match="not readable YAML"):
        load_fleet(broken)


def test_hashes_have_mosquittos_pbkdf2_format_and_verify():
    hashed = hash_password("s3cret", iterations=101)
    _, kind, iterations, salt, digest = hashed.split("$")
    assert (kind, iterations) == ("7", "101")
    assert len(base64.b64decode(salt)) == 12 and len(base64.b64decode(digest)) == 64  # as mosquitto_passwd
    assert verify_password("s3cret", hashed) and not verify_password("s3cret!", hashed)
    assert hash_password("s3cret") != hashed  # a fresh salt each time
    assert hash_password("x", iterations=1).startswith("$7$1$")
    with pytest.raises(ConfigError, match="at least 1"):
        hash_password("x", iterations=0)


def test_a_hash_written_by_mosquitto_passwd_verifies():
    assert verify_password("secret", MOSQUITTO_PASSWD_ENTRY)
    assert not verify_password("Secret", MOSQUITTO_PASSWD_ENTRY)
    assert not verify_password("secret", "$6$notpbkdf2$abc") and not verify_password("secret", "plain")


def test_the_acl_gives_each_device_its_own_topics_only():
    fleet = Fleet.model_validate({"devices": {"cam-2": {"group": "south"}, "cam-1": {"group": "north"}}})
    assert acl_text(fleet).splitlines()[1:] == [
        f"user {CONTROL_PLANE_USER}", "topic readwrite fleet/#", "",
        "user cam-1", "topic read fleet/north/model", "topic write fleet/north/status/cam-1",
        "topic write fleet/north/telemetry/cam-1", "",
        "user cam-2", "topic read fleet/south/model", "topic write fleet/south/status/cam-2",
        "topic write fleet/south/telemetry/cam-2"]
    assert acl_text(fleet).endswith("cam-2\n")


def test_add_device_keeps_only_the_hash_and_writes_broker_files(tmp_path):
    fleet_file, credentials = tmp_path / "fleet.yaml", tmp_path / "credentials"
    password = add_device(fleet_file, credentials, "cam-1", "north")
    hashes = read_password_file(credentials / PASSWORD_FILE)
    assert set(hashes) == {CONTROL_PLANE_USER, "cam-1"}
    assert verify_password(password, hashes["cam-1"])
    assert verify_password(ensure_control_plane(credentials), hashes[CONTROL_PLANE_USER])
    assert not any(password in path.read_text() for path in [*credentials.iterdir(), fleet_file])
    assert "topic write fleet/north/status/cam-1" in (credentials / ACL_FILE).read_text()
    assert yaml.safe_load(fleet_file.read_text()) == {"devices": {"cam-1": {"group": "north"}}}
    for secret in (PASSWORD_FILE, ACL_FILE, CONTROL_PLANE_PASSWORD_FILE):
        assert _mode(credentials / secret) == 0o600, secret


def test_a_known_device_needs_replace_which_issues_a_new_password(tmp_path):
    fleet_file, credentials = tmp_path / "fleet.yaml", tmp_path / "credentials"
    first = add_device(fleet_file, credentials, "cam-1", "north")
    control_plane_hash = read_password_file(credentials / PASSWORD_FILE)[CONTROL_PLANE_USER]
    with pytest.raises(ConfigError, match="already in .* pass --replace"):
        add_device(fleet_file, credentials, "cam-1", "south")
    second = add_device(fleet_file, credentials, "cam-1", "south", replace=True)
    hashes = read_password_file(credentials / PASSWORD_FILE)
    assert verify_password(second, hashes["cam-1"]) and not verify_password(first, hashes["cam-1"])
    assert hashes[CONTROL_PLANE_USER] == control_plane_hash  # the control plane's password is kept
    assert load_fleet(fleet_file).devices["cam-1"].group == "south"
    assert "fleet/north" not in (credentials / ACL_FILE).read_text().split(f"user {CONTROL_PLANE_USER}")[1]


@pytest.mark.parametrize(("device", "group", "expected"), [
    ("cam/1", "north", "device id 'cam/1'"), ("cam+1", "north", "device id"), ("cam-1", "no rth", "group 'no rth'"),
    ("control-plane", "north", "control plane's broker user"), ("cam-1", "", "group ''"),
    ("site--a", "north", "device id 'site--a'"), ("-cam", "north", "no two in a row, none first or last"),
    ("cam.", "north", "device id 'cam.'"), ("cam#1", "north", "device id"), ("c" * 65, "north", "1-64 letters"),
])
def test_add_device_refuses_ids_that_are_not_topic_levels(tmp_path, device, group, expected):
    with pytest.raises(ConfigError, match="1-64 letters|control plane") as caught:
        add_device(tmp_path / "fleet.yaml", tmp_path / "credentials", device, group)
    assert expected in str(caught.value)
    assert not (tmp_path / "fleet.yaml").exists()


def test_a_fleet_file_with_an_ambiguous_device_id_is_refused(tmp_path):
    fleet_file = tmp_path / "fleet.yaml"
    fleet_file.write_text("devices:\n  site--a: {group: north}\n")
    with pytest.raises(ConfigError, match="site--a") as caught:
        load_fleet(fleet_file)
    assert DEVICE_ID_RULE in str(caught.value)


def test_remove_device_drops_it_everywhere(tmp_path):
    fleet_file, credentials = tmp_path / "fleet.yaml", tmp_path / "credentials"
    add_device(fleet_file, credentials, "cam-1", "north")
    kept = add_device(fleet_file, credentials, "cam-2", "north")
    remove_device(fleet_file, credentials, "cam-1")
    assert set(load_fleet(fleet_file).devices) == {"cam-2"}
    hashes = read_password_file(credentials / PASSWORD_FILE)
    assert set(hashes) == {CONTROL_PLANE_USER, "cam-2"} and verify_password(kept, hashes["cam-2"])
    assert "cam-1" not in (credentials / ACL_FILE).read_text()
    with pytest.raises(ConfigError, match="'cam-1' is not in"):
        remove_device(fleet_file, credentials, "cam-1")


def test_broker_files_refuse_a_device_without_a_password(tmp_path):
    fleet = Fleet.model_validate({"devices": {"cam-1": {"group": "north"}}})
    with pytest.raises(ConfigError, match="no broker password for cam-1 .* --replace"):
        write_broker_files(fleet, tmp_path)


def test_a_broken_password_file_is_reported(tmp_path):
    (tmp_path / PASSWORD_FILE).write_text("cam-1:$7$1$a$b\nnot a hash line\n")
    with pytest.raises(ConfigError, match="line 2 is not 'user:\\$hash'"):
        read_password_file(tmp_path / PASSWORD_FILE)


def test_the_control_plane_password_is_created_once(tmp_path):
    password = ensure_control_plane(tmp_path)
    assert len(password) >= 32 and ensure_control_plane(tmp_path) == password
    assert _mode(tmp_path / CONTROL_PLANE_PASSWORD_FILE) == 0o600


def test_a_simulated_fleet_returns_plaintext_for_the_simulator_and_keeps_hashes(tmp_path):
    devices = simulated_fleet(12, ["north", "south", "east"], tmp_path, iterations=1)
    assert list(devices)[:2] == ["sim-00", "sim-01"] and len(devices) == 12
    assert [group for group, _ in devices.values()][:4] == ["north", "south", "east", "north"]
    fleet = load_fleet(tmp_path / "fleet.yaml")
    assert {device: entry.group for device, entry in fleet.devices.items()} == {
        device: group for device, (group, _) in devices.items()}
    hashes = read_password_file(tmp_path / PASSWORD_FILE)
    assert all(verify_password(password, hashes[device]) for device, (_, password) in devices.items())
    assert hashes["sim-05"].startswith("$7$1$")
    with pytest.raises(ConfigError, match="at least one device and one group"):
        simulated_fleet(0, ["north"], tmp_path)
    with pytest.raises(ConfigError, match="group"):
        simulated_fleet(2, ["no/rth"], tmp_path)


def test_a_simulated_fleet_can_spread_its_devices_over_device_classes(tmp_path):
    simulated_fleet(5, ["lab"], tmp_path, iterations=1, classes=["x86-gateway", "rpi4-8gb"])
    assert load_fleet(tmp_path / "fleet.yaml").classes("lab") == {
        "sim-0": "x86-gateway", "sim-1": "rpi4-8gb", "sim-2": "x86-gateway", "sim-3": "rpi4-8gb",
        "sim-4": "x86-gateway"}
    simulated_fleet(2, ["lab"], tmp_path, iterations=1)
    assert set(load_fleet(tmp_path / "fleet.yaml").classes("lab").values()) == {None}  # no classes: none given
    with pytest.raises(ConfigError, match="devices.yaml name"):
        simulated_fleet(2, ["lab"], tmp_path, classes=["Not A Class"])


def test_the_cli_prints_the_password_once_lists_and_writes_broker_files(tmp_path, capsys):
    fleet_file, credentials = tmp_path / "fleet.yaml", tmp_path / "credentials"
    common = ["--fleet", str(fleet_file), "--credentials", str(credentials)]
    assert fleet_cli.main(["add-device", "cam-1", "--group", "north", *common]) == 0
    password = capsys.readouterr().out.strip()
    assert verify_password(password, read_password_file(credentials / PASSWORD_FILE)["cam-1"])
    assert fleet_cli.main(["add-device", "cam-1", "--group", "north", *common]) == 2
    assert "pass --replace" in capsys.readouterr().err
    assert fleet_cli.main(["list", *common]) == 0
    assert capsys.readouterr().out == "cam-1\tnorth\t-\n"  # no class
    assert fleet_cli.main(["broker-files", *common]) == 0
    assert capsys.readouterr().out.split() == [str(credentials / PASSWORD_FILE), str(credentials / ACL_FILE)]
    assert fleet_cli.main(["list", "--fleet", str(tmp_path / "absent.yaml"), "--credentials", str(credentials)]) == 2
    assert "not found" in capsys.readouterr().err


def test_the_cli_defaults_come_from_the_rollout_params(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"rollout": {"fleet_file": str(tmp_path / "inventory.yaml"),
                                                  "credentials_dir": str(tmp_path / "secrets")}}))
    assert fleet_cli.main(["add-device", "cam-1", "--group", "north", "--params", str(params)]) == 0
    password = capsys.readouterr().out.strip()
    assert verify_password(password, read_password_file(tmp_path / "secrets" / PASSWORD_FILE)["cam-1"])
    assert set(load_fleet(tmp_path / "inventory.yaml").devices) == {"cam-1"}


def test_the_cli_creates_the_ca_enrolls_rotates_and_revokes(tmp_path, capsys):
    from pathlib import Path

    from cryptography import x509

    from tasks.registry.bundle import generate_keypair

    generate_keypair(tmp_path / "keys", "control-plane")
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"package": {"public_keys": str(tmp_path / "keys")},
                                      "rollout": {"broker": "broker.example:8883", "broker_tls": True}}))
    common = ["--params", str(params), "--fleet", str(tmp_path / "fleet.yaml"), "--credentials",
              str(tmp_path / "mqtt"), "--ca-dir", str(tmp_path / "ca")]
    assert fleet_cli.main(["ca", "init", *common]) == 0
    assert fleet_cli.main(["ca", "init", *common]) == 2 and "already holds a fleet CA" in capsys.readouterr().err
    assert fleet_cli.main(["server-cert", "broker", "--host", "broker.example", "--host", "10.0.0.2", *common]) == 0
    served = x509.load_pem_x509_certificate(Path(capsys.readouterr().out.strip()).read_bytes())
    names = served.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["broker.example"]
    kit = tmp_path / "kit"
    for _ in range(2):  # enrolling again rotates the device's key
        assert fleet_cli.main(["enroll", "cam-1", "--group", "north", "--out", str(kit), *common]) == 0
    assert capsys.readouterr().out.split() == [str(kit)] * 2
    assert (kit / "keys" / "control-plane.pub").is_file() and not (kit / "keys" / "control-plane.key").exists()
    assert "user cam-1" in (tmp_path / "mqtt" / ACL_FILE).read_text()
    assert fleet_cli.main(["broker-files", *common[2:], "--params", str(params)]) == 0  # TLS: the ACL only
    assert capsys.readouterr().out.split() == [str(tmp_path / "mqtt" / ACL_FILE)]
    assert fleet_cli.main(["revoke", "cam-1", "--superseded", *common]) == 0
    assert len(capsys.readouterr().out.split()) == 1  # the first certificate only
    assert set(load_fleet(tmp_path / "fleet.yaml").devices) == {"cam-1"}
    assert fleet_cli.main(["revoke", "cam-1", *common]) == 0
    assert "user cam-1" not in (tmp_path / "mqtt" / ACL_FILE).read_text()
    assert fleet_cli.main(["revoke", "nobody", *common]) == 2
    assert "no certificate was issued to 'nobody'" in capsys.readouterr().err
