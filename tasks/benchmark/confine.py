"""Confine a local benchmark process to a device's CPUs and memory.

cgroup v2 (``cpu.max``, ``memory.max``, ``memory.swap.max``) or v1 (``cpu.cfs_quota_us``,
``memory.limit_in_bytes``, ``memory.memsw.limit_in_bytes``, ``cpuset.cpus``), whichever the host
mounts and lets us write; else ``taskset`` (cores) plus ``prlimit --as`` (address space, a looser bound
than resident memory), and the result says so. The child joins the group before it executes, so
everything it starts is inside too.
"""

from __future__ import annotations

import contextlib
import math
import os
import shlex
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


@dataclass
class Confinement:
    """How a child is confined: a method, the files whose ``cgroup.procs`` it joins, or a command prefix."""

    method: str                                   # cgroup-v2 | cgroup-v1 | taskset+prlimit | none
    cpus: float | None
    memory_mb: int | None
    procs_files: list[Path] = field(default_factory=list)
    prefix: list[str] = field(default_factory=list)
    note: str = ""

    def wrap(self, command: list[str]) -> list[str]:
        """``command`` run inside the confinement: a shell moves itself into the groups, then execs it (no
        ``preexec_fn``, which is unsafe in a threaded parent); or the taskset/prlimit prefix."""
        if not self.procs_files:
            return [*self.prefix, *command]
        joins = "; ".join(f"echo $$ > {shlex.quote(str(procs))}" for procs in self.procs_files)
        return ["/bin/sh", "-c", f"{joins} && exec \"$@\"", "edgeloop-bench", *command]

    def describe(self) -> dict[str, object]:
        return {"method": self.method, "cpus": self.cpus, "memory_mb": self.memory_mb, "note": self.note}


def _write(path: Path, value: str) -> None:
    path.write_text(value)


def _v2_group(name: str, cpus: float | None, memory_mb: int | None) -> Path | None:
    if not (CGROUP_ROOT / "cgroup.controllers").is_file():
        return None
    controllers = (CGROUP_ROOT / "cgroup.controllers").read_text().split()
    if (cpus and "cpu" not in controllers) or (memory_mb and "memory" not in controllers):
        return None
    with contextlib.suppress(OSError):  # enabling may fail (already on, or not allowed): checked below
        _write(CGROUP_ROOT / "cgroup.subtree_control", " ".join(f"+{c}" for c in ("cpu", "memory") if c in controllers))
    group = CGROUP_ROOT / name
    group.mkdir()
    if memory_mb:
        _write(group / "memory.max", str(memory_mb * 1024 * 1024))
        with contextlib.suppress(OSError):
            _write(group / "memory.swap.max", "0")
    if cpus:
        _write(group / "cpu.max", f"{int(cpus * PERIOD_US)} {PERIOD_US}")
    return group


def _v1_groups(name: str, cpus: float | None, memory_mb: int | None, groups: list[Path]) -> list[Path] | None:
    cpu_root, memory_root = CGROUP_ROOT / "cpu", CGROUP_ROOT / "memory"
    if (cpus and not (cpu_root / "cpu.cfs_quota_us").is_file()) or (
            memory_mb and not (memory_root / "memory.limit_in_bytes").is_file()):
        return None
    if memory_mb:
        group = memory_root / name
        group.mkdir()
        groups.append(group)
        limit = str(memory_mb * 1024 * 1024)
        _write(group / "memory.limit_in_bytes", limit)
        if (memory_root / "memory.memsw.limit_in_bytes").is_file():  # no swap: the device has none
            _write(group / "memory.memsw.limit_in_bytes", limit)
    if cpus:
        group = cpu_root / name
        group.mkdir()
        groups.append(group)
        _write(group / "cpu.cfs_period_us", str(PERIOD_US))
        _write(group / "cpu.cfs_quota_us", str(int(cpus * PERIOD_US)))
        cpuset_root = CGROUP_ROOT / "cpuset"
        if (cpuset_root / "cpuset.cpus").is_file():  # the device's core count, not the host's
            group = cpuset_root / name
            group.mkdir()
            groups.append(group)
            host_cpus = sorted(os.sched_getaffinity(0))
            wanted = host_cpus[:max(1, math.ceil(cpus))]
            _write(group / "cpuset.cpus", ",".join(str(c) for c in wanted))
            _write(group / "cpuset.mems", (cpuset_root / "cpuset.mems").read_text().strip())
    return groups


def _remove(groups: list[Path]) -> None:
    for group in reversed(groups):
        with contextlib.suppress(OSError):
            group.rmdir()


def _cgroup_confinement(name: str, cpus: float | None, memory_mb: int | None) -> tuple[Confinement | None, str]:
    """A cgroup v2 or v1 confinement, or None and why not (partly made groups are removed)."""
    made: list[Path] = []
    try:
        v2 = _v2_group(name, cpus, memory_mb)
        if v2 is not None:
            return Confinement("cgroup-v2", cpus, memory_mb, [v2 / "cgroup.procs"]), ""
        v1 = _v1_groups(name, cpus, memory_mb, made)
        if v1 is not None:
            return Confinement("cgroup-v1", cpus, memory_mb, [g / "cgroup.procs" for g in v1]), ""
        return None, "no cgroup cpu/memory controllers mounted"
    except OSError as error:  # not root, read-only cgroupfs, controller not delegated
        _remove(made + [CGROUP_ROOT / name])
        return None, f"cgroups not usable ({error.strerror or error})"


def _fallback(cpus: float | None, memory_mb: int | None, problem: str) -> Confinement:
    prefix: list[str] = []
    if cpus and shutil.which("taskset"):
        cores = sorted(os.sched_getaffinity(0))[:max(1, math.ceil(cpus))]
        prefix += ["taskset", "-c", ",".join(str(c) for c in cores)]
    if memory_mb and shutil.which("prlimit"):
        prefix += ["prlimit", f"--as={memory_mb * 1024 * 1024}"]
    if not prefix:
        return Confinement("none", cpus, memory_mb, note=f"{problem}; taskset/prlimit not found: not confined")
    return Confinement("taskset+prlimit", cpus, memory_mb, prefix=prefix,
                       note=f"{problem}: taskset pins the cores, prlimit bounds the address space (looser than RSS)")


@contextlib.contextmanager
def confined(cpus: float | None, memory_mb: int | None) -> Iterator[Confinement]:
    """A :class:`Confinement` for the device's ``cpus`` and ``memory_mb`` (None: not limited); removed after."""
    if not cpus and not memory_mb:
        yield Confinement("none", None, None, note="the device's runner sets no cpus or memory_mb")
        return
    confinement, problem = _cgroup_confinement(f"edgeloop-bench-{uuid.uuid4().hex[:12]}", cpus, memory_mb)
    if confinement is None:
        yield _fallback(cpus, memory_mb, problem)
        return
    try:
        yield confinement
    finally:
        _remove([procs.parent for procs in confinement.procs_files])
