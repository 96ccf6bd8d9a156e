"""Unit tests for the device inventory (tasks/devices.py and the shipped devices.yaml)."""

from __future__ import annotations

import copy
import csv
from pathlib import Path
from typing import Any

import pytest
import yaml

from tasks.config import ConfigError
from tasks.devices import (
    DeviceInventory,
    device_fit,
    devices_table,
    format_table,
    load_devices,
    main,
    write_devices_csv,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED = REPO_ROOT / "devices.yaml"
EXPECTED_NAMES = ["rpi4-8gb", "jetson-xavier-nx", "industrial-256mb", "x86-gateway"]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def shipped_raw() -> dict[str, Any]:
    return yaml.safe_load(SHIPPED.read_text())


@pytest.fixture(scope="module")
def inventory() -> DeviceInventory:
    return load_devices(SHIPPED)


def _write(tmp_path: Path, raw: Any) -> Path:
    path = tmp_path / "devices.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return path


def test_shipped_inventory_loads(inventory: DeviceInventory) -> None:
    assert [d.name for d in inventory.devices] == EXPECTED_NAMES
    pi = inventory.get("rpi4-8gb")
    assert (pi.cpu_arch, pi.cores, pi.ram_mb, pi.preferred_runtime) == ("aarch64", 4, 8192, "tflite")
    assert (pi.runner.kind, pi.runner.platform, pi.runner.memory_mb) == ("docker", "linux/arm64", 8192)
    small = inventory.get("industrial-256mb")
    assert (small.cpu_arch, small.ram_mb, small.runner.platform) == ("armv7l", 256, "linux/arm/v7")
    jetson = inventory.get("jetson-xavier-nx")
    assert jetson.accelerator == "gpu" and jetson.runner.kind == "ssh" and jetson.runner.host
    assert inventory.get("x86-gateway").runner.kind == "local"


def test_default_path_is_repo_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    assert len(load_devices().devices) == 4


def _mutate(raw: dict[str, Any], index: int, **changes: Any) -> dict[str, Any]:
    bad = copy.deepcopy(raw)
    for key, value in changes.items():
        if key.startswith("runner_"):
            bad["devices"][index]["runner"][key.removeprefix("runner_")] = value
        else:
            bad["devices"][index][key] = value
    return bad


@pytest.mark.parametrize(
    ("index", "changes", "expected"),
    [
        (0, {"colour": "red"}, ["devices.0.colour", "unknown key", "rpi4-8gb"]),
        (1, {"runner_bogus": 1}, ["devices.1.runner.bogus", "unknown key", "kind, host"]),
        (2, {"ram_mb": "lots"}, ["devices.2.ram_mb", "'lots'", "industrial-256mb"]),
        (2, {"ram_mb": -256}, ["devices.2.ram_mb", "-256", "greater than 0"]),
        (0, {"cpu_arch": "mips"}, ["devices.0.cpu_arch", "'mips'", "aarch64"]),
        (3, {"thermal_limit_c": 200}, ["devices.3.thermal_limit_c", "200", "125"]),
        (0, {"preferred_runtime": "tensorrt"}, ["preferred_runtime", "'tensorrt'", "onnx"]),
        (1, {"runner_host": None}, ["devices.1.runner", "host is required", "ssh"]),
        (0, {"runner_platform": None}, ["devices.0.runner", "platform", "docker"]),
        (3, {"name": "rpi4-8gb"}, ["duplicate", "rpi4-8gb"]),
        (3, {"name": "X86 Gateway"}, ["devices.3.name", "'X86 Gateway'"]),
        (0, {"accelerator_model": "none really"}, ["accelerator_model", "accelerator"]),
    ],
)
def test_bad_entries_name_the_key(
    tmp_path: Path, shipped_raw: dict[str, Any], index: int, changes: dict[str, Any], expected: list[str]
) -> None:
    path = _write(tmp_path, _mutate(shipped_raw, index, **changes))
    with pytest.raises(ConfigError) as caught:
        load_devices(path)
    message = str(caught.value)
    for fragment in expected:
        assert fragment in message, f"{fragment!r} not in:\n{message}"


def test_missing_required_key(tmp_path: Path, shipped_raw: dict[str, Any]) -> None:
    bad = copy.deepcopy(shipped_raw)
    del bad["devices"][1]["storage_mb"]
    with pytest.raises(ConfigError, match=r"devices\.1\.storage_mb \[jetson-xavier-nx\]: got \(missing\)"):
        load_devices(_write(tmp_path, bad))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"devices": []}, "devices"),
        ({}, "devices"),
        ({"devices": [], "hosts": 1}, "hosts"),
        ("- just\n- a list\n", "mapping"),
        ("", "mapping"),
        ("devices: [\n  {name: rpi4\n", "not valid YAML"),
    ],
)
def test_bad_files(tmp_path: Path, raw: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        load_devices(_write(tmp_path, raw))


def test_missing_file_says_where(tmp_path: Path) -> None:
    missing = tmp_path / "nope" / "devices.yaml"
    with pytest.raises(ConfigError, match="not found") as caught:
        load_devices(missing)
    assert str(missing) in str(caught.value)


def test_table_and_csv(tmp_path: Path, inventory: DeviceInventory) -> None:
    rows = devices_table(inventory)
    assert len(rows) == 4 and rows[0]["runner_kind"] == "docker" and "runner" not in rows[0]
    out = write_devices_csv(inventory, tmp_path / "nested" / "devices.csv")
    assert out == tmp_path / "nested" / "devices.csv"
    with out.open(newline="") as handle:
        reader = csv.DictReader(handle)
        read = list(reader)
    assert "runner_kind" in (reader.fieldnames or []) and "runner_platform" in (reader.fieldnames or [])
    assert [r["name"] for r in read] == EXPECTED_NAMES
    assert read[2]["ram_mb"] == "256" and read[3]["runner_host"] == ""
    assert [p.name for p in out.parent.iterdir()] == ["devices.csv"]  # no temp file left behind


def test_format_table_is_aligned(inventory: DeviceInventory) -> None:
    lines = format_table(inventory).splitlines()
    assert len(lines) == 2 + 4
    assert lines[0].startswith("name") and set(lines[1]) <= {"-", " "}
    column = lines[0].index("arch")
    assert all(line[column:].startswith(("aarch64", "armv7l", "x86_64")) for line in lines[2:])


def test_device_fit(inventory: DeviceInventory) -> None:
    small = inventory.get("industrial-256mb")
    fits, reason = device_fit(small, 2 * MB, 20 * MB)
    assert fits and reason == "fits: model 2.0 MB of 512 MB storage, working set 20.0 MB of 256 MB RAM"

    fits, reason = device_fit(small, 100 * MB, 300 * MB)
    assert not fits and reason == "needs 300.0 MB RAM, device has 256 MB"

    fits, reason = device_fit(small, 600 * MB, 700 * MB)
    assert not fits and "storage" in reason and "600.0 MB" in reason and "512 MB" in reason

    assert device_fit(small, 512 * MB, 256 * MB)[0]  # exactly at the limits still fits
    assert device_fit(inventory.get("rpi4-8gb"), 100 * MB, 300 * MB)[0]
    with pytest.raises(ValueError):
        device_fit(small, -1, 0)


def test_main_writes_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "reports" / "devices.csv"
    assert main(["--devices", str(SHIPPED), "--out", str(out)]) == 0
    assert out.is_file() and len(out.read_text().splitlines()) == 5
    printed = capsys.readouterr().out
    assert "jetson-xavier-nx" in printed and str(out) in printed


def test_main_bad_file_returns_2(
    tmp_path: Path, shipped_raw: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, _mutate(shipped_raw, 2, ram_mb=-1))
    out = tmp_path / "devices.csv"
    assert main(["--devices", str(path), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert "devices.2.ram_mb" in captured.err and "industrial-256mb" in captured.err
    assert "Traceback" not in captured.err and not out.exists()

    assert main(["--devices", str(tmp_path / "missing.yaml"), "--out", str(out)]) == 2
    assert "not found" in capsys.readouterr().err
