"""A Docker engine for packaging, tests and benchmarks: the one ``DOCKER_HOST`` names, or our own dockerd.

When no engine answers (``DOCKER_HOST``, else ``/var/run/docker.sock``), Debian's ``dockerd`` is
started with its own data-root (in the cache folder, so imported base images and build layers
survive between runs), exec-root, pid file and socket (``tasks.stack.services.start_docker_engine``);
``down`` ends exactly that process (by the starter's pid file, else by dockerd's own pid file in
the cache folder: that data-root is only ever ours).

    edgeloop engine up      # prints the DOCKER_HOST to use
    edgeloop engine down
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import psutil

from tasks.packaging.docker_client import CACHE_DIR
from tasks.stack.processes import REPO_ROOT, ServiceError, stop
from tasks.stack.services import start_docker_engine


def stop_own_engine(cache_dir: Path = CACHE_DIR, timeout_s: float = 30.0) -> bool:
    """Stop the dockerd on our data-root by its own pid file (when the pid file of the starter is gone)."""
    pid_file = cache_dir / "docker" / "dockerd.pid"
    try:
        process = psutil.Process(int(pid_file.read_text().strip()))
        if "--data-root" not in process.cmdline():
            return False  # the pid was reused by something else
        process.terminate()
    except (OSError, ValueError, psutil.Error):
        return False
    try:
        process.wait(timeout_s)
    except psutil.TimeoutExpired:
        pass  # still shutting down: it was told to stop
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the Docker engine edgeloop builds with")
    parser.add_argument("action", choices=["up", "down"])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    parser.add_argument("--only-this-run", action="store_true",
                        help="down: stop only a dockerd that --run-dir's `up` started (never another one on our "
                             "data-root, e.g. the demo's)")
    args = parser.parse_args(argv)
    try:
        if args.action == "up":
            print(start_docker_engine(args.run_dir))
        else:
            stopped = stop("dockerd", args.run_dir) or (not args.only_this_run and stop_own_engine())
            print("stopped dockerd" if stopped else "no dockerd of ours was running")
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
