"""Start and stop the local services edgeloop uses: a Prefect server, an MLflow server, a Prefect worker.

Prefect and MLflow keep their state in SQLite under the run folder (the demo), or in PostgreSQL for a team
(``--database postgres``: :mod:`tasks.stack.postgres`; ``--database-url`` for a server you run). MLflow
serves its artifacts itself (``mlflow-artifacts:/``), so a worker on another host needs only the two URLs.

Each runs in the background in its own process group, with a pid file and a log in the run folder
(``.run/`` by default; :mod:`tasks.stack.processes`); ``down`` stops exactly the processes ``up`` started.
``up`` reuses services that are already running and healthy.

    edgeloop services up        # Prefect :4200, MLflow :5000, worker on pool edgeloop-process
    edgeloop services up --database postgres    # the same on PostgreSQL :5433 (make control-plane)
    edgeloop services down
    edgeloop services status
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
from dataclasses import replace
from pathlib import Path

from tasks.packaging.docker_client import CACHE_DIR, answers, cache_lock, find_engine, own_engine_host
from tasks.stack import backup, prefect_admin
from tasks.stack.postgres import DEFAULT_PORT, Postgres, connect, ensure_databases, start_postgres
from tasks.stack.processes import REPO_ROOT, Service, ServiceError, healthy, log_tail, running_pid, start, stop
from tasks.stack.redis import messaging_env, start_redis

BIN = Path(sys.executable).parent
WORK_POOL = "edgeloop-process"


def free_port() -> int:
    """A TCP port nothing listens on right now (for scratch servers in tests and benchmarks)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def prefect_env(home: Path, port: int, host: str = "127.0.0.1") -> dict[str, str]:
    """The settings of a Prefect server on ``host:port`` and of its clients (``host``: the server's address)."""
    return {"PREFECT_HOME": str(home), "PREFECT_API_URL": f"http://{host}:{port}/api",
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_UI_API_URL": f"http://{host}:{port}/api",
            "PREFECT_SERVER_API_HOST": host, "PREFECT_LOGGING_LEVEL": "INFO",
            "PREFECT_SERVER_SERVICES_PAUSE_EXPIRATIONS_LOOP_SECONDS": "2"}


def start_prefect(run_dir: Path, port: int, schedules: bool = True, database: Postgres | None = None,
                  host: str = "127.0.0.1", netns: str | None = None) -> Service:
    """A Prefect server on ``host`` (loopback), analytics off, its database in PostgreSQL or SQLite in
    ``run_dir/prefect``; ``netns``: the network namespace it runs in (a host of its own, in tests).

    On PostgreSQL (the team's control plane, as Prefect's self-hosting guide runs it): the schema is migrated
    once, here, before the API starts, and the API never migrates (``PREFECT_API_DATABASE_MIGRATE_ON_START=
    false``), so another API replica on the same database starts without racing it; the API runs without the
    loop services (``--no-services``), which run in a process of their own (``prefect-services``: scheduler,
    triggers, event persister, ...), the two talking through Redis (:mod:`tasks.stack.redis`).
    ``schedules=False`` turns off the scheduler service, so only runs that are asked for happen (tests).
    """
    env = prefect_env(run_dir / "prefect", port, host)
    if not schedules:
        env["PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED"] = "false"
    command = [str(BIN / "prefect"), "server", "start", "--host", host, "--port", str(port)]
    health = f"http://{host}:{port}/api/health"
    running = running_pid(run_dir, "prefect-server") is not None and healthy(health)  # reused: migrated already
    if database is not None and not running:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database.database_url("prefect", driver="asyncpg")
        prefect_admin.migrate(env)
        env["PREFECT_API_DATABASE_MIGRATE_ON_START"] = "false"
        env.update(messaging_env(start_redis(run_dir, free_port(), netns=netns)[1]))
        start("prefect-services", [str(BIN / "prefect"), "server", "services", "start"], run_dir, env, None,
              "prefect loop services", netns=netns)
        command.append("--no-services")
    return start("prefect-server", command, run_dir, env, health, f"http://{host}:{port}", netns=netns)


def start_mlflow(run_dir: Path, port: int, database: Postgres | None = None, host: str = "127.0.0.1") -> Service:
    """An MLflow tracking server on ``host``: PostgreSQL or SQLite backend; artifacts served by it from
    ``run_dir/mlflow`` (a worker needs only its URL)."""
    root = run_dir / "mlflow"
    root.mkdir(parents=True, exist_ok=True)
    store = f"sqlite:///{root / 'mlflow.db'}" if database is None else database.database_url("mlflow", "psycopg2")
    command = [str(BIN / "mlflow"), "server", "--backend-store-uri", store,
               "--artifacts-destination", str(root / "artifacts"), "--host", host, "--port", str(port),
               "--workers", "1"]
    return start("mlflow-server", command, run_dir, {}, f"http://{host}:{port}/health", f"http://{host}:{port}")


def start_worker(run_dir: Path, prefect_port: int, mlflow_url: str, pool: str = WORK_POOL,
                 server_host: str = "127.0.0.1", netns: str | None = None, name: str = "prefect-worker",
                 limit: int | None = None, queues: list[str] | None = None) -> Service:
    """A process worker on ``pool`` of the server on ``server_host``; its flow runs log to ``mlflow_url``.
    ``netns``: the network namespace it runs in; ``name``: its pid file's (and Prefect's) name; ``limit``: the
    most flow runs it runs at once (a small host's); ``queues``: the pool's work queues it takes runs from (all)."""
    env = {**prefect_env(run_dir / "prefect", prefect_port, server_host), "MLFLOW_TRACKING_URI": mlflow_url,
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(prefect_admin.HEARTBEAT_S)}  # the crash detection's input
    command = [str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process",
               *(["--name", name] if name != "prefect-worker" else []), *(["--limit", str(limit)] if limit else []),
               *(option for queue in queues or [] for option in ("--work-queue", queue))]
    return start(name, command, run_dir, env, None, pool, netns=netns)


def ensure_work_pool(run_dir: Path, prefect_port: int, pool: str = WORK_POOL, server_host: str = "127.0.0.1") -> None:
    """Create the process work pool unless it exists (deployments must find it before a worker polls)."""
    prefect_admin.ensure_work_pool(prefect_env(run_dir / "prefect", prefect_port, server_host), pool)


def start_edge_server(run_dir: Path, port: int, settings: dict[str, str], name: str = "edge-serve",
                      host: str = "127.0.0.1", netns: str | None = None) -> Service:
    """The edge inference service (``python -m edge.serving.serve``) with ``EDGELOOP_*`` settings, on loopback
    (or on ``host`` inside network namespace ``netns``: a simulated device on a host of its own)."""
    env = {f"EDGELOOP_{key.upper()}": str(value) for key, value in settings.items()}
    command = [sys.executable, "-m", "edge.serving.serve", "--host", host, "--port", str(port)]
    return start(name, command, run_dir, env, f"http://{host}:{port}/healthz", f"http://{host}:{port}",
                 timeout_s=60.0, netns=netns)


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


def up(run_dir: Path, prefect_port: int, mlflow_port: int, schedules: bool = True,
       database: Postgres | None = None) -> list[Service]:
    """Prefect, MLflow and a worker; on ``database`` (checked first: one clear error when it does not answer)."""
    if database is not None:
        connect(database).close()
        ensure_databases(database)
    prefect = start_prefect(run_dir, prefect_port, schedules, database)
    ensure_work_pool(run_dir, prefect_port)
    prefect_admin.ensure_crash_detection(f"{prefect.url}/api")
    mlflow = start_mlflow(run_dir, mlflow_port, database)
    worker = start_worker(run_dir, prefect_port, mlflow.url)
    return [prefect, mlflow, worker]


def down(run_dir: Path) -> list[str]:
    return [name for name in ("edge-serve", "prefect-worker", "mlflow-server", "prefect-server", "prefect-services",
                              "redis", "postgres", "registry", "sshd", "mosquitto", "dockerd") if stop(name, run_dir)]


def database_of(args: argparse.Namespace, run_dir: Path) -> Postgres | None:
    """None for SQLite; the server ``--database-url`` names; or ours, started (``--database postgres``)."""
    if args.database_url:
        if not args.database_url.startswith(("postgresql://", "postgres://")):
            raise ServiceError(f"--database-url must be postgresql://USER:PASSWORD@HOST:PORT, got "
                               f"{args.database_url.split('@')[-1]!r}")
        return Postgres("postgresql://" + args.database_url.split("://", 1)[1].rstrip("/"), args.database_prefix)
    if args.database == "postgres":
        return replace(start_postgres(run_dir, args.postgres_port, args.postgres_dir), prefix=args.database_prefix)
    return None


def backup_or_restore(args: argparse.Namespace) -> None:
    """``services backup --to DIR`` / ``services restore --from DIR`` (:mod:`tasks.stack.backup`)."""
    database = database_of(args, args.run_dir)
    if database is None:
        raise ServiceError(f"{args.action} is for the PostgreSQL control plane: add --database postgres (ours) or "
                           "--database-url (yours); the SQLite demo's state is the run folder itself")
    artifacts = args.run_dir / "mlflow" / "artifacts"
    if args.action == "backup":
        if args.to is None:
            raise ServiceError("backup needs --to DIR (a folder that does not exist yet)")
        manifest = backup.backup(database, artifacts, args.to, args.dvc_remote)
        print(f"backed up {database.shown} to {args.to}: {json.dumps(manifest['contents'])}")
        return
    if args.source is None:
        raise ServiceError("restore needs --from DIR (a folder `edgeloop services backup` wrote)")
    servers = ("prefect-server", "prefect-services", "mlflow-server", "prefect-worker")
    running = [name for name in servers if running_pid(args.run_dir, name)]
    if running:
        raise ServiceError(f"{', '.join(running)} still run on this control plane: `edgeloop services down` first")
    manifest = backup.restore(args.source, database, artifacts, args.dvc_remote, args.force)
    print(f"restored {args.source} (made {manifest['created']}) onto {database.shown}: "
          f"{json.dumps(manifest['contents'])}; start it with `edgeloop services up` and the same --database options")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="local edgeloop services")
    parser.add_argument("action", choices=["up", "down", "status", "backup", "restore", "automations"])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    parser.add_argument("--prefect-port", type=int, default=int(os.environ.get("EDGELOOP_PREFECT_PORT", 4200)))
    parser.add_argument("--mlflow-port", type=int, default=int(os.environ.get("EDGELOOP_MLFLOW_PORT", 5000)))
    parser.add_argument("--images", action="store_true",
                        help="also a Docker engine (ours unless one answers) and an image registry, for packaging")
    parser.add_argument("--registry-port", type=int, default=int(os.environ.get("EDGELOOP_REGISTRY_PORT", 5050)))
    parser.add_argument("--database", choices=["sqlite", "postgres"], default=os.environ.get("EDGELOOP_DATABASE",
                        "sqlite"), help="where Prefect and MLflow keep their state (postgres: a team control plane)")
    parser.add_argument("--database-url", default=os.environ.get("EDGELOOP_DATABASE_URL"),
                        help="a PostgreSQL server you run: postgresql://USER:PASSWORD@HOST:PORT")
    parser.add_argument("--postgres-port", type=int, default=int(os.environ.get("EDGELOOP_POSTGRES_PORT",
                                                                                DEFAULT_PORT)))
    parser.add_argument("--postgres-dir", type=Path, default=None, help="our PostgreSQL's data and password folder")
    parser.add_argument("--database-prefix", default=os.environ.get("EDGELOOP_DATABASE_PREFIX", ""),
                        help="before the databases' names (PREFIXprefect, PREFIXmlflow): several control planes on "
                             "one server")
    parser.add_argument("--to", type=Path, help="backup: the new folder the backup is written to")
    parser.add_argument("--from", dest="source", type=Path, help="restore: the folder a backup was written to")
    parser.add_argument("--dvc-remote", type=Path, help="backup/restore: the DVC remote's folder on this host")
    parser.add_argument("--force", action="store_true", help="restore: replace databases that already hold data")
    parser.add_argument("--api-url", help="automations: the Prefect API of a control plane we did not start "
                                          "(the compose stack): its work pool and crash detection, created once")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            database = database_of(args, args.run_dir)
            if database is not None:
                print(f"{'postgresql':15s} {database.shown}")
            for service in up(args.run_dir, args.prefect_port, args.mlflow_port, database=database):
                print(f"{service.name:15s} pid {service.pid:<7d} {service.url}  (log {service.log})")
            for name in ("prefect-services", "redis"):  # the team control plane's (PostgreSQL) only
                if (pid := running_pid(args.run_dir, name)) is not None:
                    print(f"{name:15s} pid {pid:<7d} (log {args.run_dir / f'{name}.log'})")
            if args.images:
                print(f"{'docker engine':15s} {start_docker_engine(args.run_dir)}")
                registry = start_registry(args.run_dir, args.registry_port)
                print(f"{registry.name:15s} pid {registry.pid:<7d} {registry.url}  (log {registry.log})")
        elif args.action == "automations":
            if not args.api_url:
                raise ServiceError("automations needs --api-url http://HOST:4200/api")
            prefect_admin.ensure_work_pool({"PREFECT_API_URL": args.api_url}, WORK_POOL)
            prefect_admin.ensure_crash_detection(args.api_url)
            print(f"{args.api_url}: work pool {WORK_POOL}, automation {prefect_admin.CRASH_AUTOMATION!r}")
        elif args.action in ("backup", "restore"):
            backup_or_restore(args)
        elif args.action == "down":
            print("stopped: " + (", ".join(down(args.run_dir)) or "nothing was running"))
        else:
            for name in ("prefect-server", "prefect-services", "redis", "mlflow-server", "prefect-worker", "postgres",
                         "registry", "dockerd"):
                pid = running_pid(args.run_dir, name)
                print(f"{name:15s} {'running, pid ' + str(pid) if pid else 'stopped'}")
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
