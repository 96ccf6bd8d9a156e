"""Start and stop the local services edgeloop uses: a Prefect server, an MLflow server, a Prefect worker.

Each runs in the background in its own process group, with a pid file and a log in the run folder
(``.run/`` by default); ``down`` stops exactly the processes ``up`` started. ``up`` reuses services
that are already running and healthy.

    edgeloop services up        # Prefect :4200, MLflow :5000, worker on pool edgeloop-process
    edgeloop services down
    edgeloop services status
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tasks.packaging.docker_client import CACHE_DIR, answers, cache_lock, find_engine, own_engine_host

REPO_ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
WORK_POOL = "edgeloop-process"


class ServiceError(RuntimeError):
    """A service that did not start or answer; the message points at its log."""


@dataclass(frozen=True)
class Service:
    name: str
    pid: int
    url: str
    log: Path


def free_port() -> int:
    """A TCP port nothing listens on right now (for scratch servers in tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


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
        try:
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except FileNotFoundError:
            return None
        if marker in command_line:
            return pid
        time.sleep(0.02)
    return None


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


def log_tail(log: Path, lines: int = 15) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.is_file() else ""


def start(name: str, command: list[str], run_dir: Path, env: dict[str, str], health_url: str | None,
          url: str, timeout_s: float = 120.0) -> Service:
    """Start ``command`` in the background (or reuse a running one) and wait until it answers."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"{name}.log"
    pid = running_pid(run_dir, name)
    if pid is not None and (health_url is None or healthy(health_url)):
        return Service(name, pid, url, log)
    with open(log, "ab") as handle:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, **env}, stdout=handle,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    pid_file(run_dir, name).write_text(f"{process.pid} {Path(command[0]).name}\n")
    if health_url:
        try:
            wait_healthy(health_url, timeout_s, process.pid, log)
        except ServiceError:
            stop(name, run_dir)
            raise
    return Service(name, process.pid, url, log)


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


def prefect_env(home: Path, port: int) -> dict[str, str]:
    return {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api",
            "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_LOOP_SECONDS": "2"}


def start_prefect(run_dir: Path, port: int, schedules: bool = True) -> Service:
    """A Prefect server on loopback with a SQLite database in ``run_dir/prefect``, analytics off.

    ``schedules=False`` turns off the scheduler service, so only runs that are asked for happen (tests).
    """
    env = prefect_env(run_dir / "prefect", port)
    if not schedules:
        env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    return start("prefect-server", command, run_dir, env, f"http://127.0.0.1:{port}/api/health",
                 f"http://127.0.0.1:{port}")


def start_mlflow(run_dir: Path, port: int) -> Service:
    """An MLflow tracking server: SQLite backend and a local artifact root under ``run_dir/mlflow``."""
    root = run_dir / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
               "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
               "--workers", "1"]
    return start("mlflow-server", command, run_dir, {}, f"http://127.0.0.1:{port}/health",
                 f"http://127.0.0.1:{port}")


def start_worker(run_dir: Path, prefect_port: int, mlflow_url: str, pool: str = WORK_POOL) -> Service:
    """A process worker on ``pool`` (created if missing); its flow runs log to ``mlflow_url``."""
    env = {**prefect_env(run_dir / "prefect", prefect_port), "MLFLOW_TRACKING_URI": mlflow_url,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"]
    return start("prefect-worker", command, run_dir, env, None, pool)


def ensure_work_pool(run_dir: Path, prefect_port: int, pool: str = WORK_POOL) -> None:
    """Create the process work pool unless it exists (deployments must find it before a worker polls)."""
    env = {**os.environ, **prefect_env(run_dir / "prefect", prefect_port)}
    inspect = subprocess.run([str(BIN / "prefect"), "work-pool", "inspect", pool], env=env, capture_output=True,
                             text=True, timeout=120)
    if inspect.returncode == 0:
        return
    created = subprocess.run([str(BIN / "prefect"), "work-pool", "create", pool, "--type", "process"], env=env,
                             capture_output=True, text=True, timeout=120)
    if created.returncode != 0:
        raise ServiceError(f"could not create work pool {pool}: {created.stdout[-500:]}{created.stderr[-500:]}")


def start_edge_server(run_dir: Path, port: int, settings: dict[str, str], name: str = "edge-serve") -> Service:
    """The edge inference service (``python -m edge.serving.serve``) with ``EDGELOOP_*`` settings, on loopback."""
    env = {f"EDGELOOP_{key.upper()}": str(value) for key, value in settings.items()}
    command = [sys.executable, "-m", "edge.serving.serve", "--host", "127.0.0.1", "--port", str(port)]
    return start(name, command, run_dir, env, f"http://127.0.0.1:{port}/healthz", f"http://127.0.0.1:{port}",
                 timeout_s=60.0)


def start_registry(run_dir: Path, port: int) -> Service:
    """A Docker registry (Debian's docker-registry, API v2) on loopback, storing under ``run_dir/registry``."""
    binary = shutil.which("docker-registry")
    if binary is None:
        raise ServiceError("docker-registry is missing: apt-get install docker-registry")
    root = run_dir / "registry"
    (root / "data").mkdir(parents=True, exist_ok=True)
    config = root / "config.yml"
    config.write_text(f"""version: 0.1
log: {{level: warn}}
storage:
  filesystem: {{rootdirectory: {root / 'data'}}}
  delete: {{enabled: true}}
http:
  addr: 127.0.0.1:{port}
""")
    return start("registry", [binary, "serve", str(config)], run_dir, {}, f"http://127.0.0.1:{port}/v2/",
                 f"127.0.0.1:{port}")


def start_docker_engine(run_dir: Path, cache_dir: Path = CACHE_DIR, timeout_s: float = 60.0) -> str:
    """The ``DOCKER_HOST`` of a running engine, starting our own dockerd when none answers.

    Serialised by a lock in the cache folder: of two processes starting at once (CI's warm-up and the
    tests), the second waits and finds the first one's engine.
    """
    with cache_lock("dockerd", cache_dir):
        found = find_engine(cache_dir)
        return found if found is not None else _start_dockerd(run_dir, cache_dir, timeout_s)


def _start_dockerd(run_dir: Path, cache_dir: Path, timeout_s: float) -> str:
    dockerd = shutil.which("dockerd", path=f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin")
    if dockerd is None:
        raise ServiceError("no Docker engine answers (DOCKER_HOST, /var/run/docker.sock) and dockerd is not "
                           "installed: apt-get install docker.io, or point DOCKER_HOST at an engine")
    root = cache_dir / "docker"
    root.mkdir(parents=True, exist_ok=True)
    exec_root = Path("/tmp") / f"edgeloop-docker-{os.getuid()}"  # short: unix socket paths live under it
    host = own_engine_host(cache_dir)
    command = [dockerd, "--data-root", str(root / "data"), "--exec-root", str(exec_root),
               "--pidfile", str(root / "dockerd.pid"), "-H", host]
    service = start("dockerd", command, run_dir, {}, health_url=None, url=host)
    deadline = time.monotonic() + timeout_s
    while not answers(host):
        if running_pid(run_dir, "dockerd") is None:
            raise ServiceError(f"dockerd exited before it answered on {host}; see {service.log}:\n"
                               f"{log_tail(service.log)}")
        if time.monotonic() > deadline:
            stop("dockerd", run_dir)
            raise ServiceError(f"dockerd did not answer on {host} within {timeout_s:.0f} s; see {service.log}")
        time.sleep(0.5)
    return host


@dataclass(frozen=True)
class SshTarget:
    """A loopback sshd standing in for a device: where it listens and the files a client needs."""

    host: str
    port: int
    user: str
    client_key: Path
    known_hosts: Path


def listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def start_sshd(run_dir: Path, port: int, timeout_s: float = 20.0) -> SshTarget:
    """Debian's sshd on loopback with its own generated host key, a client key allowed for the current user,
    key authentication only, and a known_hosts file holding its host key (so clients verify it)."""
    search = f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/sbin"
    sshd, keygen = shutil.which("sshd", path=search), shutil.which("ssh-keygen", path=search)
    if sshd is None or keygen is None:
        raise ServiceError("sshd or ssh-keygen is missing: apt-get install openssh-server")
    root = run_dir / "sshd"
    root.mkdir(parents=True, exist_ok=True)
    host_key, client_key = root / "ssh_host_ed25519_key", root / "client_ed25519"
    for key in (host_key, client_key):
        if not key.is_file():
            subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-C", key.name, "-f", str(key)], check=True,
                           capture_output=True)
    (root / "authorized_keys").write_text(client_key.with_suffix(".pub").read_text())
    (root / "authorized_keys").chmod(0o600)
    algorithm, public = host_key.with_suffix(".pub").read_text().split()[:2]
    known_hosts = root / "known_hosts"
    known_hosts.write_text(f"[127.0.0.1]:{port} {algorithm} {public}\n")
    config = root / "sshd_config"
    config.write_text(f"""Port {port}
ListenAddress 127.0.0.1
HostKey {host_key}
PidFile {root / 'sshd.pid'}
AuthorizedKeysFile {root / 'authorized_keys'}
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
Subsystem sftp internal-sftp
""")
    Path("/run/sshd").mkdir(parents=True, exist_ok=True)  # sshd's privilege separation directory
    service = start("sshd", [sshd, "-D", "-e", "-f", str(config)], run_dir, {}, None, f"127.0.0.1:{port}")
    deadline = time.monotonic() + timeout_s
    while not listening(port):  # by the pid itself: sshd rewrites its command line as it starts
        if not process_alive(service.pid) or time.monotonic() > deadline:
            stop("sshd", run_dir)
            raise ServiceError(f"sshd did not listen on 127.0.0.1:{port}; see {service.log}:\n{log_tail(service.log)}")
        time.sleep(0.1)
    import getpass

    return SshTarget("127.0.0.1", port, getpass.getuser(), client_key, known_hosts)


def up(run_dir: Path, prefect_port: int, mlflow_port: int, schedules: bool = True) -> list[Service]:
    prefect = start_prefect(run_dir, prefect_port, schedules)
    ensure_work_pool(run_dir, prefect_port)
    mlflow = start_mlflow(run_dir, mlflow_port)
    worker = start_worker(run_dir, prefect_port, mlflow.url)
    return [prefect, mlflow, worker]


def down(run_dir: Path) -> list[str]:
    return [name for name in ("edge-serve", "prefect-worker", "mlflow-server", "prefect-server", "registry", "sshd",
                              "mosquitto", "dockerd") if stop(name, run_dir)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local edgeloop services")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    parser.add_argument("--prefect-port", type=int, default=int(os.environ.get("EDGELOOP_PREFECT_PORT", 4200)))
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("EDGELOOP_MLFLOW_PORT", 5000)))
    parser.add_argument("--images", action="store_true",
                        help="also a Docker engine (ours unless one answers) and an image registry, for packaging")
    parser.add_argument("--registry-port", type=int, default=int(os.environ.get("EDGELOOP_REGISTRY_PORT", 5050)))
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            for service in up(args.run_dir, args.prefect_port, args.mlflow_port):
                print(f"{service.name:15s} pid {service.pid:<7d} {service.url}  (log {service.log})")
            if args.images:
                print(f"{'docker engine':15s} {start_docker_engine(args.run_dir)}")
                registry = start_registry(args.run_dir, args.registry_port)
                print(f"{registry.name:15s} pid {registry.pid:<7d} {registry.url}  (log {registry.log})")
        elif args.action == "down":
            print("stopped: " + (", ".join(down(args.run_dir)) or "nothing was running"))
        else:
            for name in ("prefect-server", "mlflow-server", "prefect-worker", "registry", "dockerd"):
                pid = running_pid(args.run_dir, name)
                print(f"{name:15s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
