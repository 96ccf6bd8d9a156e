"""What an on-device benchmark reads besides the model: the environment it runs in (CPU, RAM, the cgroup
limits it is under, runtime versions) and energy sensors (a RAPL-style counter in µJ, or a power sensor
in µW integrated over the interval). Standard library only."""

from __future__ import annotations

import os
import platform
import threading
import time
from pathlib import Path
from typing import Any

RAPL_COUNTER = Path("/sys/class/powercap/intel-rapl:0/energy_uj")
CGROUP_ROOT = Path("/sys/fs/cgroup")
UNLIMITED_V1 = 1 << 60  # cgroup v1 reports "no limit" as a number near 2**63
POWER_SAMPLE_S = 0.01


# ---- the environment -------------------------------------------------------------------------------

def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cpu_model() -> str | None:
    """The CPU's name from /proc/cpuinfo ("model name" on x86, "Model" or the ARM part number on ARM)."""
    text = _read(Path("/proc/cpuinfo")) or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):
        return fields["model name"]
    if fields.get("Model"):
        return fields["Model"]
    parts = {"0xd03": "Cortex-A53", "0xd04": "Cortex-A35", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57",
             "0xd08": "Cortex-A72", "0xd0b": "Cortex-A76", "0xd0c": "Neoverse-N1", "0x004": "Carmel"}
    part = fields.get("CPU part")
    return f"ARM {parts.get(part, part)}" if part else None


def _own_cgroups() -> dict[str, str]:
    """Controller -> path of this process's cgroup ('' key: the v2 unified hierarchy)."""
    groups: dict[str, str] = {}
    for line in (_read(Path("/proc/self/cgroup")) or "").splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            groups[controller] = path
    return groups


def _cgroup_file(hierarchy: str, path: str, name: str) -> str | None:
    """``name`` in this process's cgroup, else at the hierarchy's root (a container sees its own as root)."""
    base = CGROUP_ROOT / hierarchy if hierarchy else CGROUP_ROOT
    for candidate in (base / path.lstrip("/") / name, base / name):
        value = _read(candidate)
        if value is not None:
            return value
    return None


def cgroup_limits() -> dict[str, Any]:
    """The memory limit and CPU quota this process runs under (cgroup v2 or v1); None where unlimited."""
    groups = _own_cgroups()
    memory = cpus = None
    version = None
    if "memory" in groups or "cpu" in groups:  # v1 controllers are mounted (maybe beside a v2 hierarchy)
        version = "v1"
        raw = _cgroup_file("memory", groups.get("memory", "/"), "memory.limit_in_bytes")
        if raw and raw.isdigit() and int(raw) < UNLIMITED_V1:
            memory = int(raw)
        quota = _cgroup_file("cpu", groups.get("cpu", "/"), "cpu.cfs_quota_us")
        period = _cgroup_file("cpu", groups.get("cpu", "/"), "cpu.cfs_period_us")
        if quota and period and quota.lstrip("-").isdigit() and int(quota) > 0:
            cpus = int(quota) / int(period)
    elif "" in groups:
        version = "v2"
        raw = _cgroup_file("", groups[""], "memory.max")
        if raw and raw.isdigit():
            memory = int(raw)
        raw = _cgroup_file("", groups[""], "cpu.max")
        if raw and not raw.startswith("max"):
            quota, period = raw.split()
            cpus = int(quota) / int(period)
    return {"cgroup": version, "memory_limit_bytes": memory, "cpu_quota_cores": cpus}


def _runtime_versions() -> dict[str, str | None]:
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for runtime, distribution in (("tflite", "ai-edge-litert"), ("onnx", "onnxruntime")):
        try:
            versions[runtime] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            versions[runtime] = None
    return versions


def describe_environment(emulated: bool, device: str | None) -> dict[str, Any]:
    """What the numbers were measured on."""
    meminfo = _read(Path("/proc/meminfo")) or ""
    total_kib = next((int(line.split()[1]) for line in meminfo.splitlines() if line.startswith("MemTotal:")), None)
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "device": device, "arch": platform.machine(), "cpu_model": cpu_model(), "cores": os.cpu_count(),
        "usable_cores": usable, "ram_mb": total_kib // 1024 if total_kib else None, **cgroup_limits(),
        "kernel": platform.release(), "hostname": platform.node(), "python": platform.python_version(),
        "runtimes": _runtime_versions(), "emulated": emulated,
    }


# ---- sensors ---------------------------------------------------------------------------------------

class EnergyMeter:
    """Energy over an interval from a cumulative counter (µJ) or an integrated power sensor (µW)."""

    def __init__(self, counter: Path | None, power_sensor: Path | None) -> None:
        self.counter, self.power_sensor = counter, power_sensor
        self._start_uj: int | None = None
        self._samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.seconds: float | None = None  # the interval the last stop() measured over

    @classmethod
    def find(cls, energy_counter: str | None, power_sensor: str | None) -> tuple[EnergyMeter | None, str]:
        """The meter for a configured power sensor (µW) or energy counter (µJ; default RAPL), or None and why
        there is none."""
        if power_sensor:
            path = Path(power_sensor)
            if _read(path) is None:
                return None, f"power sensor {path} is not readable"
            return cls(None, path), f"power sensor {path} (µW, sampled every {POWER_SAMPLE_S * 1000:.0f} ms)"
        counter = Path(energy_counter) if energy_counter else RAPL_COUNTER
        if (_read(counter) or "").isdigit():
            return cls(counter, None), f"energy counter {counter} (µJ, whole package)"
        if energy_counter:
            return None, f"energy counter {counter} is not readable"
        return None, "no power sensor found (no RAPL counter; configure a hwmon/INA219 power sensor)"

    def start(self) -> None:
        if self.counter is not None:
            self._start_uj = int(_read(self.counter) or 0)
            self._started = time.perf_counter()
            return
        self._samples, self._stop = [], threading.Event()
        self._take_sample()  # now, not when the thread first gets the GIL: the interval is covered from its start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _take_sample(self) -> None:
        raw = _read(self.power_sensor)
        if raw is not None and raw.lstrip("-").isdigit():
            self._samples.append((time.perf_counter(), int(raw) / 1e6))

    def _sample(self) -> None:
        while not self._stop.wait(POWER_SAMPLE_S):
            self._take_sample()

    def stop(self) -> float | None:
        """Joules since :meth:`start`; None when the sensor gave nothing usable."""
        if self.counter is not None:
            end_uj = int(_read(self.counter) or 0)
            self.seconds = time.perf_counter() - self._started
            delta = end_uj - (self._start_uj or 0)
            if delta < 0:  # the counter wrapped
                wrap = _read(self.counter.with_name("max_energy_range_uj"))
                delta += int(wrap) if wrap and wrap.isdigit() else 0
            return delta / 1e6 if delta >= 0 else None
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._take_sample()  # a last reading: the interval is covered to its end
        samples = self._samples
        if len(samples) < 2:
            return None
        self.seconds = samples[-1][0] - samples[0][0]
        return sum((t1 - t0) * (p0 + p1) / 2 for (t0, p0), (t1, p1) in zip(samples, samples[1:]))
