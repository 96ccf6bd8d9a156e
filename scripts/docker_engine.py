"""A Docker engine for packaging, tests and benchmarks: the one ``DOCKER_HOST`` names, or our own dockerd.

When no engine answers (``DOCKER_HOST``, else ``/var/run/docker.sock``), ``ensure`` starts Debian's
``dockerd`` with its own data-root (in the cache folder, so imported base images and build layers
survive between runs), exec-root, pid file and socket, and ``stop`` ends exactly that process.

    python -m scripts.docker_engine up      # prints the DOCKER_HOST to use
    python -m scripts.docker_engine down
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from scripts.services import REPO_ROOT, ServiceError, running_pid, start, stop
from tasks.release.engine import CACHE_DIR, answers, find_engine, own_engine_host

NAME = "dockerd"


def ensure(run_dir: Path, cache_dir: Path = CACHE_DIR, timeout_s: float = 60.0) -> str:
    """The ``DOCKER_HOST`` of a running engine, starting our own dockerd when none answers."""
    found = find_engine(cache_dir)
    if found is not None:
        return found
    dockerd = shutil.which("dockerd")
    if dockerd is None:
        raise ServiceError("no Docker engine answers (DOCKER_HOST, /var/run/docker.sock) and dockerd is not "
                           "installed: apt-get install docker.io, or point DOCKER_HOST at an engine")
    root = cache_dir / "docker"
    root.mkdir(parents=True, exist_ok=True)
    exec_root = Path("/tmp") / f"edgeloop-docker-{os.getuid()}"  # short: unix socket paths live under it
    host = own_engine_host(cache_dir)
    command = [dockerd, "--data-root", str(root / "data"), "--exec-root", str(exec_root),
               "--pidfile", str(root / "dockerd.pid"), "-H", host]
    service = start(NAME, command, run_dir, {}, health_url=None, url=host)
    deadline = time.monotonic() + timeout_s
    while not answers(host):
        if running_pid(run_dir, NAME) is None or time.monotonic() > deadline:
            stop(NAME, run_dir)
            raise ServiceError(f"dockerd did not answer on {host} within {timeout_s:.0f} s; see {service.log}")
        time.sleep(0.5)
    return host


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the Docker engine edgeloop builds with")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            print(ensure(args.run_dir))
        else:
            print("stopped dockerd" if stop(NAME, args.run_dir) else "no dockerd of ours was running")
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
