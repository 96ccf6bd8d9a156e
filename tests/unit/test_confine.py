"""Confinement of local benchmarks: cgroup v1/v2 files written as the kernel expects, or the taskset+prlimit
fallback (run for real). The real cgroups are exercised in tests/integration/test_device_benchmark.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.benchmark import confine


def _fake_v1(root):
    for controller, files in {"cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
                              "memory": ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"),
                              "cpuset": ("cpuset.cpus", "cpuset.mems")}.items():
        (root / controller).mkdir(parents=True)
        for name in files:
            (root / controller / name).write_text("0\n")


def _fake_v2(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (root / "cgroup.subtree_control").write_text("")


def test_cgroup_v1_limits_are_written_and_the_child_joins_every_group(tmp_path, monkeypatch):
    _fake_v1(tmp_path)
    monkeypatch.setattr(confine, "CGROUP_ROOT", tmp_path)
    with confine.confined(1.5, 300) as confinement:
        assert confinement.method == "cgroup-v1"
        groups = {procs.parent.parent.name: procs.parent for procs in confinement.procs_files}
        assert (groups["memory"] / "memory.limit_in_bytes").read_text() == str(300 * 2**20)
        assert (groups["memory"] / "memory.memsw.limit_in_bytes").read_text() == str(300 * 2**20)  # no swap
        assert (groups["cpu"] / "cpu.cfs_quota_us").read_text() == "150000"
        assert (groups["cpuset"] / "cpuset.cpus").read_text().count(",") <= 1  # ceil(1.5) cores at most
        completed = subprocess.run(confinement.wrap([sys.executable, "-c", "import os; print(os.getpid())"]),
                                   capture_output=True, text=True, check=True)
        pid = completed.stdout.strip()
        assert all(procs.read_text().strip() == pid for procs in confinement.procs_files)  # exec kept the pid
        for procs in confinement.procs_files:  # a real cgroupfs removes its pseudo-files with the dir
            for path in procs.parent.iterdir():
                path.unlink()
    assert not any(path.name.startswith("edgeloop-bench-") for path in (tmp_path / "memory").iterdir())


def test_cgroup_v2_limits_are_written(tmp_path, monkeypatch):
    _fake_v2(tmp_path)
    monkeypatch.setattr(confine, "CGROUP_ROOT", tmp_path)
    with confine.confined(2.0, 512) as confinement:
        assert confinement.method == "cgroup-v2"
        group = confinement.procs_files[0].parent
        assert (group / "memory.max").read_text() == str(512 * 2**20)
        assert (group / "memory.swap.max").read_text() == "0"
        assert (group / "cpu.max").read_text() == "200000 100000"
        assert "+cpu" in (tmp_path / "cgroup.subtree_control").read_text()
        for path in group.iterdir():
            path.unlink()


def test_without_cgroups_taskset_and_prlimit_confine_and_say_so(tmp_path, monkeypatch):
    monkeypatch.setattr(confine, "CGROUP_ROOT", tmp_path / "nothing-mounted")
    with confine.confined(1.0, 256) as confinement:
        assert confinement.method == "taskset+prlimit" and "looser than RSS" in confinement.note
        probe = ("import os, resource; print(len(os.sched_getaffinity(0)), "
                 "resource.getrlimit(resource.RLIMIT_AS)[0])")
        completed = subprocess.run(confinement.wrap([sys.executable, "-c", probe]), capture_output=True, text=True)
    assert completed.returncode == 0, completed.stderr
    cores, address_space = completed.stdout.split()
    assert cores == "1" and int(address_space) == 256 * 2**20


def test_no_limits_means_no_confinement():
    with confine.confined(None, None) as confinement:
        assert confinement.method == "none" and confinement.wrap(["x"]) == ["x"]


@pytest.mark.parametrize("kind", ["v1", "v2"])
def test_a_cgroup_that_cannot_be_written_falls_back_and_leaves_nothing(tmp_path, monkeypatch, kind):
    (_fake_v1 if kind == "v1" else _fake_v2)(tmp_path)
    monkeypatch.setattr(confine, "CGROUP_ROOT", tmp_path)
    monkeypatch.setattr(confine, "_write", lambda path, value: (_ for _ in ()).throw(PermissionError(13, "denied")))
    with confine.confined(1.0, 128) as confinement:
        assert confinement.method in ("taskset+prlimit", "none") and "cgroups not usable" in confinement.note
    assert not list(tmp_path.rglob("edgeloop-bench-*"))
