"""The hardware inventory of edge targets, loaded from ``devices.yaml``.

Validation follows :mod:`tasks.config`: unknown keys, wrong types and out-of-range values raise
:class:`~tasks.config.ConfigError` naming the key, the value and what is allowed.
CLI: ``edgeloop devices [--devices devices.yaml] [--out reports/devices.csv]``.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.config import format_validation_error
from tasks.errors import ConfigError

DEVICES_FILE = Path("devices.yaml")
MB = 1024 * 1024
# terminal table: column header -> DeviceSpec field (the runner column is added after these)
TABLE_COLUMNS = {"name": "name", "arch": "cpu_arch", "cores": "cores", "ram_mb": "ram_mb", "storage_mb": "storage_mb"}
TABLE_COLUMNS |= {"accel": "accelerator", "power_w": "power_budget_w", "thermal_c": "thermal_limit_c"}
TABLE_COLUMNS |= {"runtime": "preferred_runtime", "budget_ms": "latency_budget_ms"}


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RunnerSpec(_Spec):
    """How on-device benchmarks reach a device."""

    kind: Literal["local", "ssh", "docker", "prefect"]
    host: str | None = Field(None, min_length=1)
    port: int | None = Field(None, ge=1, le=65535)
    user: str | None = Field(None, min_length=1)
    platform: str | None = Field(None, pattern=r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")
    cpus: float | None = Field(None, gt=0.0)
    memory_mb: int | None = Field(None, gt=0)
    python: str = Field("python3", min_length=1)  # ssh: the device's Python (with numpy and the runtime)
    workdir: str | None = Field(None, min_length=1)  # prefect: where the device's worker finds edge/ and flows/
    threads: int | None = Field(None, ge=1, le=1024)  # runtime threads (default: the device's cores)
    # extra ONNX Runtime providers, each also measured (e.g. CUDAExecutionProvider)
    onnx_providers: list[Annotated[str, Field(pattern=r"^[A-Za-z][A-Za-z0-9]{0,62}ExecutionProvider$")]] = Field(
        default_factory=list)
    compare_xnnpack: bool = False  # also measure LiteRT without XNNPACK

    @model_validator(mode="after")
    def _kind_needs(self) -> RunnerSpec:
        if self.kind == "ssh" and self.host is None:
            raise ValueError("runner.host is required when runner.kind is 'ssh'")
        if self.kind == "docker" and self.platform is None:
            raise ValueError("runner.platform (e.g. linux/arm64) is required when runner.kind is 'docker'")
        return self


class DeviceSpec(_Spec):
    """One edge device: compute, memory, power and thermal envelope, and its benchmark runner."""

    name: str = Field(pattern=r"^[a-z0-9]+(-[a-z0-9]+)*$", max_length=64)
    cpu_arch: Literal["aarch64", "armv7l", "x86_64"]
    cores: int = Field(ge=1, le=1024)
    ram_mb: int = Field(gt=0)
    storage_mb: int = Field(gt=0)
    accelerator: Literal["none", "gpu", "npu", "tpu", "dsp"] = "none"
    accelerator_model: str | None = Field(None, min_length=1)
    power_budget_w: float = Field(gt=0.0)
    thermal_limit_c: float = Field(ge=40.0, le=125.0)
    preferred_runtime: Literal["tflite", "onnx"]
    latency_budget_ms: float = Field(gt=0.0)
    runner: RunnerSpec

    @model_validator(mode="after")
    def _model_needs_accelerator(self) -> DeviceSpec:
        if self.accelerator == "none" and self.accelerator_model is not None:
            raise ValueError("accelerator_model is only allowed when accelerator is not 'none'")
        return self

    def benchmark_configs(self) -> list[dict[str, Any]]:
        """The runtime configurations measured on the device: the default, plus each listed option alone."""
        threads = self.runner.threads or self.cores
        configs = [{"name": "default", "threads": threads, "xnnpack": True, "providers": ["CPUExecutionProvider"]}]
        if self.runner.compare_xnnpack:
            configs.append({"name": "no-xnnpack", "threads": threads, "xnnpack": False,
                            "providers": ["CPUExecutionProvider"]})
        for provider in self.runner.onnx_providers:
            configs.append({"name": provider, "threads": threads, "xnnpack": True,
                            "providers": [provider, "CPUExecutionProvider"]})
        return configs


class DeviceInventory(_Spec):
    """All devices in ``devices.yaml``; names are unique."""

    devices: list[DeviceSpec] = Field(min_length=1)

    @field_validator("devices")
    @classmethod
    def _unique_names(cls, devices: list[DeviceSpec]) -> list[DeviceSpec]:
        names = [d.name for d in devices]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"duplicate device name(s) {', '.join(duplicates)}; each name must be unique")
        return devices

    def get(self, name: str) -> DeviceSpec:
        """The device called ``name``; KeyError lists the known names."""
        for device in self.devices:
            if device.name == name:
                return device
        raise KeyError(f"unknown device {name!r}; known: {', '.join(d.name for d in self.devices)}")


def _format_error(error: ValidationError, raw: dict[str, Any], source: str) -> str:
    """``format_validation_error`` plus the device name per line and the real allowed keys."""
    lines = format_validation_error(error, source).replace("invalid parameters", "invalid device inventory")
    out = lines.splitlines()
    if len(out) != len(error.errors()) + 1:  # a multi-line message: leave the lines as they are
        return lines
    entries = raw.get("devices") if isinstance(raw.get("devices"), list) else []
    for i, problem in enumerate(error.errors(), start=1):
        loc = problem["loc"]
        key = ".".join(str(part) for part in loc)
        if problem["type"] == "extra_forbidden":
            model = RunnerSpec if "runner" in loc[:-1] else DeviceSpec if len(loc) > 2 else DeviceInventory
            out[i] = f"  - {key}: unknown key; allowed: {', '.join(model.model_fields)}"
        if len(loc) >= 2 and loc[0] == "devices" and isinstance(loc[1], int) and loc[1] < len(entries):
            entry = entries[loc[1]]
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                out[i] = out[i].replace(f"  - {key}:", f"  - {key} [{entry['name']}]:", 1)
    return "\n".join(out)


def load_devices(path: Path | str = DEVICES_FILE) -> DeviceInventory:
    """Load and validate the device inventory, raising :class:`ConfigError` on any problem."""
    path = Path(path)
    if not path.is_file():
        where = path if path.is_absolute() else f"{path} (resolved to {path.resolve()})"
        raise ConfigError(f"device inventory {where} not found; run from the repository root or pass --devices")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping with a top-level 'devices:' list, got {type(raw).__name__}")
    try:
        return DeviceInventory.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(_format_error(error, raw, str(path))) from None


def devices_table(inventory: DeviceInventory) -> list[dict[str, Any]]:
    """One flat row per device; runner fields are prefixed ``runner_``."""
    rows = []
    for device in inventory.devices:
        row = device.model_dump(mode="json", exclude={"runner"})
        row.update({f"runner_{k}": v for k, v in device.runner.model_dump(mode="json").items()})
        rows.append(row)
    return rows


def write_devices_csv(inventory: DeviceInventory, path: Path) -> Path:
    """Write :func:`devices_table` as CSV atomically (temp file in the same dir, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = devices_table(inventory)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _runner_text(runner: RunnerSpec) -> str:
    if runner.kind == "ssh":
        user = f"{runner.user}@" if runner.user else ""
        port = f":{runner.port}" if runner.port else ""
        return f"ssh {user}{runner.host}{port}"
    return f"{runner.kind} {runner.platform}" if runner.platform else runner.kind


def format_table(inventory: DeviceInventory) -> str:
    """A plain, column-aligned text table of the inventory for the terminal."""
    header = [*TABLE_COLUMNS, "runner"]
    rows = [
        [f"{v:g}" if isinstance(v, float) else str(v) for v in (getattr(d, f) for f in TABLE_COLUMNS.values())]
        + [_runner_text(d.runner)]
        for d in inventory.devices
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def device_fit(device: DeviceSpec, model_size_bytes: int, working_set_bytes: int) -> tuple[bool, str]:
    """Whether a model fits ``device``: file vs storage, working set vs RAM; returns (fits, reason).

    ``working_set_bytes`` is the estimated peak RAM of inference: tensor arena plus the loaded model.
    """
    if model_size_bytes < 0 or working_set_bytes < 0:
        raise ValueError(f"sizes must be >= 0, got model {model_size_bytes} and working set {working_set_bytes}")
    model_mb, ram_need_mb = model_size_bytes / MB, working_set_bytes / MB
    if model_size_bytes > device.storage_mb * MB:
        return False, f"needs {model_mb:.1f} MB storage, device has {device.storage_mb} MB"
    if working_set_bytes > device.ram_mb * MB:
        return False, f"needs {ram_need_mb:.1f} MB RAM, device has {device.ram_mb} MB"
    return True, (
        f"fits: model {model_mb:.1f} MB of {device.storage_mb} MB storage, "
        f"working set {ram_need_mb:.1f} MB of {device.ram_mb} MB RAM"
    )


def main(argv: list[str] | None = None) -> int:
    """Print the inventory table and write it as CSV; 2 on an invalid inventory or an unwritable CSV."""
    from tasks.entrypoint import report_user_errors
    from tasks.workspace import Workspace

    parser = argparse.ArgumentParser(prog="edgeloop devices", description="Print the hardware inventory "
                                     "(devices.yaml) as a table and write it as CSV.")
    parser.add_argument("--devices", type=Path, default=DEVICES_FILE, help="inventory YAML (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Workspace().devices_csv, help="CSV to write (default: %(default)s)")
    args = parser.parse_args(argv)

    def show() -> None:
        inventory = load_devices(args.devices)
        print(format_table(inventory))
        try:
            written = write_devices_csv(inventory, args.out)
        except OSError as error:
            raise ConfigError(f"cannot write {args.out} ({error}); pass --out with a writable path") from error
        print(f"\nwrote {len(inventory.devices)} devices to {written}")

    return report_user_errors(show)


if __name__ == "__main__":
    raise SystemExit(main())
