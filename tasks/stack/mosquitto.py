"""Mosquitto 2 for the fleet: started on loopback with the fleet's password file and ACL, persistent, and
stopped, killed, restarted or reloaded the way the rollout's fault tests and the demo need.

Its identity binding and per-client limits are :func:`tasks.rollout.broker.security_settings`, the
same lines as the compose stack's ``docker/mosquitto.conf``.

Uses :mod:`tasks.stack.processes`' pid files and logs, so ``edgeloop services down`` stops it too.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from tasks.rollout.broker import MAX_QUEUED_MESSAGES, TlsFiles, security_settings, tls_listener_settings
from tasks.stack.processes import ServiceError, pid_file, process_alive, running_pid, start, stop, wait_listening


@dataclass(frozen=True)
class Broker:
    """A Mosquitto broker on loopback started by :func:`start_mosquitto`."""

    host: str
    port: int
    pid: int
    config: Path
    log: Path
    tls: bool = False

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def address(self) -> str:
        """``HOST:PORT``, as ``rollout.broker`` and the updater's ``--broker`` take it."""
        return f"{self.host}:{self.port}"


def start_mosquitto(run_dir: Path, port: int, password_file: Path | None, acl_file: Path, *,
                    tls: TlsFiles | None = None, host: str = "127.0.0.1",
                    max_queued_messages: int = MAX_QUEUED_MESSAGES, autosave_interval_s: int = 1,
                    timeout_s: float = 20.0) -> Broker:
    """Debian's Mosquitto 2 on ``host:port``: the fleet's security settings with the given password and
    ACL files (client ids bound to user names, size, queue and in-flight limits), and persistence under
    ``run_dir/mosquitto`` so retained messages and persistent sessions outlive a restart.

    With ``tls`` the one listener is mutual TLS (:func:`tasks.rollout.broker.tls_listener_settings`):
    certificates from the fleet CA are the logins and ``password_file`` is not read (pass None).

    The in-memory state is saved on a clean stop (SIGTERM, :func:`stop_mosquitto`) and every
    ``autosave_interval_s`` seconds, so a killed broker loses at most that window. Its log is
    ``run_dir/mosquitto.log``; ``stop("mosquitto", run_dir)`` stops it by pid like the other services.
    """
    binary = _mosquitto_binary()
    root = run_dir / "mosquitto"
    named = [root, run_dir, acl_file, *([password_file] if password_file else []),
             *(vars(tls).values() if tls else [])]
    if any(" " in str(Path(path).resolve()) for path in named):
        raise ServiceError("mosquitto.conf cannot name paths with spaces; use a run folder and credential "
                           "files without them")
    if tls is None and password_file is None:
        raise ServiceError("a broker without TLS needs a password file (`edgeloop fleet broker-files`)")
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "mosquitto.conf"
    # as root Mosquitto switches to the `mosquitto` user unless told otherwise, and then cannot read
    # our 0600 password file or write under run_dir (CI runs as root)
    user = "user root\n" if os.geteuid() == 0 else ""
    passwords = None if tls else str(Path(password_file).resolve())
    security = "\n".join(security_settings(passwords, str(Path(acl_file).resolve()), max_queued_messages))
    tls_lines = tls_listener_settings(TlsFiles(*(Path(path).resolve() for path in vars(tls).values()))) if tls else []
    listener = "\n".join([f"listener {port} {host}", *tls_lines])
    config.write_text(f"""{listener}
{security}
persistence true
persistence_location {(root / 'data').resolve()}/
autosave_interval {autosave_interval_s}
set_tcp_nodelay true
pid_file {(root / 'broker.pid').resolve()}
log_dest file {(run_dir / 'mosquitto.log').resolve()}
log_timestamp_format %Y-%m-%dT%H:%M:%S
{user}""")
    return _run_mosquitto(binary, run_dir, config, host, port, tls is not None, timeout_s)


def _mosquitto_binary() -> str:
    binary = shutil.which("mosquitto", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")
    if binary is None:
        raise ServiceError("mosquitto is missing: apt-get install mosquitto")
    return binary


def _run_mosquitto(binary: str, run_dir: Path, config: Path, host: str, port: int, tls: bool,
                   timeout_s: float) -> Broker:
    broker = Broker(host, port, 0, config, run_dir / "mosquitto.log", tls)
    service = start("mosquitto", [binary, "-c", str(config)], run_dir, {}, None, broker.url)
    wait_listening("mosquitto", run_dir, service, port, timeout_s, interval_s=0.05)
    _raise_open_files_limit(service.pid)
    return Broker(host, port, service.pid, config, service.log, tls)


def _raise_open_files_limit(pid: int) -> None:
    """One descriptor per connected device: lift the broker's soft limit (often 1024) to the hard limit."""
    import resource

    try:
        _, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (hard, hard))
    except (OSError, ValueError):
        pass  # not permitted here: the broker keeps the limit it inherited


def stop_mosquitto(run_dir: Path, hard: bool = False) -> bool:
    """Stop the broker of ``run_dir``; True when one was running.

    ``hard`` kills it (SIGKILL) the way a crash or power cut would: only what the last autosave wrote
    survives. Otherwise it gets SIGTERM and saves its state first.
    """
    if not hard:
        return stop("mosquitto", run_dir)
    pid = running_pid(run_dir, "mosquitto")
    pid_file(run_dir, "mosquitto").unlink(missing_ok=True)
    if pid is None:
        return False
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        return True
    deadline = time.monotonic() + 20.0
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return True


def restart_mosquitto(run_dir: Path, broker: Broker, hard: bool = False, timeout_s: float = 20.0) -> Broker:
    """Stop ``broker`` (killed when ``hard``) and start it again on the same port with the same config and
    persistence folder, as a fault test does mid-rollout."""
    stop_mosquitto(run_dir, hard=hard)
    return _run_mosquitto(_mosquitto_binary(), run_dir, broker.config, broker.host, broker.port, broker.tls, timeout_s)


def reload_mosquitto(run_dir: Path, timeout_s: float = 20.0) -> bool:
    """Make the running broker apply changed password, ACL and CRL files; False when no broker runs in ``run_dir``.

    A password broker gets SIGHUP: it re-reads its files and re-checks every session, devices added or
    removed take effect without a restart. A mutual-TLS broker is restarted instead (cleanly: its state is
    saved first, and persistent sessions, subscriptions and queued messages come back with it; devices
    reconnect with their backoff): Mosquitto 2.0.11 (Debian 12) does not re-check an open session's
    certificate on SIGHUP, and after a SIGHUP with certificate sessions offline it was seen to crash here
    (a segfault in ``session_expiry__remove`` when such a device came back).
    """
    pid = running_pid(run_dir, "mosquitto")
    if pid is None:
        return False
    config = run_dir / "mosquitto" / "mosquitto.conf"
    text = config.read_text()
    if "use_identity_as_username true" not in text:
        os.kill(pid, signal.SIGHUP)
        return True
    _, port, host = text.splitlines()[0].split()  # "listener PORT HOST", as start_mosquitto writes it
    stop_mosquitto(run_dir)
    _run_mosquitto(_mosquitto_binary(), run_dir, config, host, int(port), True, timeout_s)
    return True
