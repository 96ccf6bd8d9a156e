"""setup/system-packages.sh: what it does where a package is missing, as root and not, without touching apt.

A stand-in ``dpkg-query`` on PATH says which packages are installed (the real one would answer for this
machine); ``apt-get`` on PATH records its calls, so nothing is installed for real here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "setup" / "system-packages.sh"


def _listed() -> list[str]:
    lines = (REPO_ROOT / "setup" / "system-packages.txt").read_text().splitlines()
    return [line.split()[0] for line in lines if line.strip() and not line.startswith("#")]


@pytest.fixture
def fake_tools():
    """A bin folder with dpkg-query (installed = the names in installed.txt) and a recording apt-get.

    It lies in a folder of its own that a non-root user can enter (pytest's tmp_path is private to root).
    """
    with tempfile.TemporaryDirectory(prefix="edgeloop-apt-") as folder:
        Path(folder).chmod(0o755)
        yield from _tools_in(Path(folder))


def _tools_in(tmp_path: Path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (tmp_path / "installed.txt").write_text("")
    (bin_dir / "dpkg-query").write_text(
        "#!/bin/sh\n"
        f'if grep -qx "$3" {tmp_path}/installed.txt; then printf installed; else exit 1; fi\n')
    (bin_dir / "apt-get").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/apt-calls.txt\n')
    for tool in ("dpkg-query", "apt-get"):
        (bin_dir / tool).chmod(0o755)
    yield tmp_path


def _run(fake, *args: str, as_nobody: bool = False, ci: bool = False) -> subprocess.CompletedProcess:
    env = {"PATH": f"{fake / 'bin'}:/usr/bin:/bin", "HOME": str(fake)}
    if ci:
        env["CI"] = "true"
    command = ["bash", str(SCRIPT), *args]
    if as_nobody and os.getuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("setpriv (util-linux) is needed to run the script as a non-root user")
        command = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", *command]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def _as_root_available() -> bool:
    return os.getuid() == 0


def test_nothing_missing_is_silent_and_installs_nothing(fake_tools):
    (fake_tools / "installed.txt").write_text("\n".join(_listed()) + "\n")
    done = _run(fake_tools)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""
    assert not (fake_tools / "apt-calls.txt").exists()
    assert _run(fake_tools, "--check").returncode == 0


def test_a_non_root_user_gets_the_sudo_line_and_what_will_not_run_and_the_command_goes_on(fake_tools):
    (fake_tools / "installed.txt").write_text("git\nwrk\n")
    missing = [name for name in _listed() if name not in ("git", "wrk")]
    done = _run(fake_tools, as_nobody=True)
    assert done.returncode == 0, done.stderr
    assert f"sudo apt-get install -y --no-install-recommends {' '.join(missing)}" in done.stderr
    assert "mosquitto: the fleet's MQTT broker" in done.stderr and "git:" not in done.stderr
    assert not (fake_tools / "apt-calls.txt").exists()
    # CI runs everything: the same situation is a failure there
    in_ci = _run(fake_tools, as_nobody=True, ci=True)
    assert in_ci.returncode == 1 and "CI=true: every package is required" in in_ci.stderr


def test_check_only_reports(fake_tools):
    done = _run(fake_tools, "--check")
    assert done.returncode == 1 and f"system packages missing: {' '.join(_listed())}" in done.stderr
    assert not (fake_tools / "apt-calls.txt").exists()


@pytest.mark.skipif(not _as_root_available(), reason="the install path runs as root only")
def test_root_updates_the_index_once_then_installs_only_what_is_missing(fake_tools):
    (fake_tools / "installed.txt").write_text("\n".join(_listed()[1:]) + "\n")
    done = _run(fake_tools)
    assert done.returncode == 0, done.stderr
    calls = (fake_tools / "apt-calls.txt").read_text().splitlines()
    assert calls == ["update -qq", f"install -y -qq --no-install-recommends {_listed()[0]}"]
