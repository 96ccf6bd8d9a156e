"""Redis for a team's Prefect: the message bus between its API processes and its background services.

Prefect's self-hosting guide runs the API (``prefect server start --no-services``, one or several replicas) apart
from the loop services (``prefect server services start``: scheduler, triggers, event persister, ...). Events a
client sends to an API process must then reach the services in another process: Prefect's in-memory broker
cannot carry them, Redis (``prefect-redis``) does. Debian's ``redis-server`` started like the other services:
its own port, a generated password (kept in the run folder, mode 0600, never printed), no persistence (the
bus holds events in flight, PostgreSQL holds the state), a pid file and a log.
"""

from __future__ import annotations

import secrets
import shutil
from pathlib import Path

from tasks.stack.processes import Service, ServiceError, running_pid, start, wait_listening


def _password(folder: Path) -> str:
    path = folder / "password"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def start_redis(run_dir: Path, port: int, host: str = "127.0.0.1", netns: str | None = None) -> tuple[Service, str]:
    """Our Redis on ``host:port`` (a running one of this run folder is reused, on its own port); the service and
    its URL (with the password). ``netns``: the network namespace it runs in (beside a Prefect there)."""
    binary = shutil.which("redis-server", path="/usr/bin:/usr/sbin:/bin")
    if binary is None:
        raise ServiceError("redis-server is missing: apt-get install redis-server (Prefect's API and its background "
                           "services talk through it on the PostgreSQL control plane)")
    folder = run_dir / "redis"
    password = _password(folder)
    config = folder / "redis.conf"  # the password in a file of ours, not on a command line others can read
    if running_pid(run_dir, "redis") is not None and config.is_file():
        port = int(next(line.split()[1] for line in config.read_text().splitlines() if line.startswith("port ")))
    config.write_text(f"port {port}\nbind {host}\nrequirepass {password}\nsave \"\"\nappendonly no\n"
                      f"dir {folder}\nprotected-mode yes\n")
    config.chmod(0o600)
    service = start("redis", [binary, str(config)], run_dir, {}, None, f"redis://{host}:{port}", netns=netns)
    wait_listening("redis", run_dir, service, port, 20.0)
    return service, f"redis://:{password}@{host}:{port}/0"


def messaging_env(url: str) -> dict[str, str]:
    """The settings that put a Prefect process's events, caches, ordering and leases on the Redis at ``url``."""
    return {"PREFECT_MESSAGING_BROKER": "prefect_redis.messaging", "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
            "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
            "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
            "PREFECT_REDIS_MESSAGING_URL": url}
