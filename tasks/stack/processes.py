"""Background processes with pid files: start one in its own process group, find it again, stop it.

Each process gets ``<name>.pid`` (its pid and the name of its program, since pids get reused) and
``<name>.log`` in a run folder. Process state (alive, command line, children, listening sockets) comes
from psutil, not from parsing ``/proc`` by hand.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]


class ServiceError(RuntimeError):
    """A service that did not start or answer; the message points at its log."""


@dataclass(frozen=True)
class Service:
    name: str
    pid: int
    url: str
    log: Path


def pid_file(run_dir: Path, name: str) -> Path:
    return run_dir / f"{name}.pid"


def process_alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped) counts as gone and is reaped if ours."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child (started by an earlier `up`)
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def command_line(pid: int) -> str | None:
    """The command line of ``pid`` as one string (its process title, if it rewrote it), or None when gone."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def running_pid(run_dir: Path, name: str) -> int | None:
    """The pid in ``name``'s pid file if that process still runs our command (pids get reused)."""
    path = pid_file(run_dir, name)
    if not path.is_file():
        return None
    recorded = path.read_text().split()
    pid, marker = (int(recorded[0]), recorded[1]) if len(recorded) == 2 else (0, "")
    if not pid or not process_alive(pid):
        return None
    for _ in range(5):  # sshd rewrites its command line (process title) as it runs: read again in that window
        found = command_line(pid)
        if found is None:
            return None
        if marker in found:
            return pid
        time.sleep(0.02)
    return None


def listening(pid: int, port: int) -> bool:
    """True once ``pid`` or one of its children listens on TCP ``port`` (asked of the kernel, no connection made)."""
    try:
        process = psutil.Process(pid)
        family = [process, *process.children(recursive=True)]
        return any(connection.status == psutil.CONN_LISTEN and connection.laddr.port == port
                   for member in family for connection in member.net_connections(kind="tcp"))
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def wait_healthy(url: str, timeout_s: float, pid: int, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if healthy(url):
            return
        if not process_alive(pid):
            raise ServiceError(f"process {pid} exited before {url} answered; see {log}:\n{log_tail(log)}")
        time.sleep(0.5)
    raise ServiceError(f"{url} did not answer within {timeout_s:.0f} s; see {log}:\n{log_tail(log)}")


def wait_listening(name: str, run_dir: Path, service: Service, port: int, timeout_s: float,
                   interval_s: float = 0.1) -> None:
    """Wait until ``service`` listens on ``port`` (by its pid: a process title may change as it starts);
    stop it and raise :class:`ServiceError` when it exits or ``timeout_s`` passes first."""
    deadline = time.monotonic() + timeout_s
    while not listening(service.pid, port):
        if not process_alive(service.pid) or time.monotonic() > deadline:
            stop(name, run_dir)
            raise ServiceError(f"{name} did not listen on port {port}; see {service.log}:\n"
                               f"{log_tail(service.log)}")
        time.sleep(interval_s)


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def start(name: str, command: list[str], run_dir: Path, env: dict[str, str], health_url: str | None,
          url: str, timeout_s: float = 120.0, user: str | None = None, netns: str | None = None) -> Service:
    """Start ``command`` in the background (or reuse a running one) and wait until it answers.

    ``user``: the account to run it as (we are root; PostgreSQL refuses to run as root). ``netns``: the
    network namespace to run it in (``ip netns exec``, which becomes the command: the pid stays ours).
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"{name}.log"
    pid = running_pid(run_dir, name)
    if pid is not None and (health_url is None or healthy(health_url)):
        return Service(name, pid, url, log)
    with open(log, "ab") as handle:
        launch = ["ip", "netns", "exec", netns, *command] if netns else command
        process = subprocess.Popen(launch, cwd="/" if user else REPO_ROOT, env={**os.environ, **env},
                                   stdout=handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True, user=user, group=_group_of(user), extra_groups=[]
                                   if user else None)
    pid_file(run_dir, name).write_text(f"{process.pid} {Path(command[0]).name}\n")
    if health_url:
        try:
            wait_healthy(health_url, timeout_s, process.pid, log)
        except ServiceError:
            stop(name, run_dir)
            raise
    return Service(name, process.pid, url, log)


def _group_of(user: str | None) -> int | None:
    import pwd

    return pwd.getpwnam(user).pw_gid if user else None


def stop(name: str, run_dir: Path, timeout_s: float = 20.0) -> bool:
    """Stop the process group ``start`` began for ``name``; True when something was stopped."""
    pid = running_pid(run_dir, name)
    pid_file(run_dir, name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and process_alive(pid):
            time.sleep(0.2)
        if not process_alive(pid):
            return True
    return True
