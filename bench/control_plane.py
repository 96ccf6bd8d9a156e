"""Concurrency of the control plane: many flow runs at once over two workers, on SQLite and on PostgreSQL.

    .venv/bin/python bench/control_plane.py [--drift 12 --training 3 --tasks 20 --workers 2 --timeout 600]

For each store, a Prefect server started by the project's stack (``tasks/stack``; PostgreSQL through
``tasks.stack.postgres``), two process workers on one pool, and ``--drift`` drift-check-shaped plus
``--training`` training-shaped runs (``bench/_control_plane_flows.py``) started at once. Counted per store:
runs that completed; crashed, failed or cancelled; still not final at ``--timeout`` (stuck); and the API's
5xx answers clients saw (Prefect's client logs each retry of a 5xx in the worker's log, which carries the
flow runs' output) plus "database is locked" errors in the server's log. Last line:
``pg_runs=… pg_runs_ok=… pg_5xx=… pg_stuck=… sqlite_runs=… sqlite_runs_ok=… sqlite_5xx=… sqlite_stuck=… wall_s=…``
"""

from __future__ import annotations

import argparse
import platform
import re
import shutil
import tempfile
import time
from pathlib import Path

from tasks.stack import services
from tasks.stack.postgres import start_postgres
from tasks.stack.processes import REPO_ROOT, stop

POOL = "edgeloop-bench"
FLOWS = {"drift": ("bench-drift-like", "drift_like"), "training": ("bench-training-like", "training_like")}
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
SERVER_ERRORS = re.compile(r"retryable status code 5\d\d|Server error '5\d\d|database is locked")


def deploy_and_start(counts: dict[str, int], tasks: int, pool: str = POOL) -> list:
    """Deploy the two bench flows to ``pool`` and start ``counts`` runs of each at once; their ids."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    with get_client(sync_client=True) as client:
        for flow_name, function in FLOWS.values():
            flow_id = client.create_flow_from_name(flow_name)
            client.create_deployment(flow_id, "bench", work_pool_name=pool, path=str(REPO_ROOT),
                                     entrypoint=f"bench/_control_plane_flows.py:{function}", pull_steps=[
                                         {"prefect.deployments.steps.set_working_directory":  # no copy per run
                                          {"directory": str(REPO_ROOT)}}])
    parameters = {"drift": {"tasks": tasks}, "training": {}}
    return [run_deployment(f"{FLOWS[kind][0]}/bench", parameters=parameters[kind], timeout=0).id
            for kind, count in counts.items() for _ in range(count)]


def wait_final(ids: list, timeout_s: float) -> dict[str, str]:
    """Each run's state type once all are final, or at ``timeout_s`` (a run still not final then is stuck)."""
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            states = {}
            for run_id in ids:
                try:
                    run = client.read_flow_run(run_id)
                    states[str(run_id)] = run.state.type.value if run.state else "UNKNOWN"
                except Exception as error:  # the API itself failing under load is a figure, not a crash
                    states[str(run_id)] = f"UNREADABLE ({type(error).__name__})"
            if all(state in FINAL for state in states.values()) or time.monotonic() > deadline:
                return states
            time.sleep(2)


def server_errors(run_dir: Path) -> int:
    """The API's 5xx answers clients retried and SQLite lock errors, from the logs in ``run_dir``."""
    return sum(len(SERVER_ERRORS.findall(log.read_text(errors="replace"))) for log in run_dir.glob("*.log"))


def run_store(name: str, args: argparse.Namespace, scratch: Path) -> dict[str, float]:
    """One store's figures: runs, ok, failed (crashed/failed/cancelled), stuck, 5xx, wall seconds."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    run_dir, port = scratch / name, services.free_port()
    database = start_postgres(run_dir, services.free_port(), scratch / "postgres") if name == "pg" else None
    workers = [f"worker-{index}" for index in range(args.workers)]
    try:
        services.start_prefect(run_dir, port, schedules=False, database=database)
        services.ensure_work_pool(run_dir, port, POOL)
        for worker in workers:
            services.start_worker(run_dir, port, "http://mlflow.invalid", POOL, name=worker)
        with temporary_settings(updates={PREFECT_API_URL: f"http://127.0.0.1:{port}/api"}):
            started = time.monotonic()
            ids = deploy_and_start({"drift": args.drift, "training": args.training}, args.tasks)
            states = wait_final(ids, args.timeout)
            wall = time.monotonic() - started
    finally:
        for service in [*workers, "prefect-server", "prefect-services", "redis", "postgres"]:
            stop(service, run_dir)
    values = list(states.values())
    figures = {"runs": len(values), "runs_ok": values.count("COMPLETED"),
               "failed": sum(value in FINAL - {"COMPLETED"} for value in values),
               "stuck": sum(value not in FINAL for value in values), "5xx": server_errors(run_dir), "wall_s": wall}
    print(f"{name:6s} runs {figures['runs']}  completed {figures['runs_ok']}  crashed/failed {figures['failed']}  "
          f"stuck {figures['stuck']}  5xx/locked {figures['5xx']}  wall {wall:.1f} s")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drift", type=int, default=12)
    parser.add_argument("--training", type=int, default=3)
    parser.add_argument("--tasks", type=int, default=20, help="task runs per drift-shaped run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="a run not final by then is stuck")
    args = parser.parse_args()
    print(f"{args.drift} drift-shaped + {args.training} training-shaped runs at once over {args.workers} workers; "
          f"{platform.processor() or platform.machine()}")
    scratch = Path(tempfile.mkdtemp(prefix="edgeloop-control-plane-"))
    scratch.chmod(0o755)  # PostgreSQL's own account must enter its data folder
    started = time.monotonic()
    try:
        sqlite, pg = run_store("sqlite", args, scratch), run_store("pg", args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"pg_runs={pg['runs']} pg_runs_ok={pg['runs_ok']} pg_5xx={pg['5xx']} pg_stuck={pg['stuck']} "
          f"sqlite_runs={sqlite['runs']} sqlite_runs_ok={sqlite['runs_ok']} sqlite_5xx={sqlite['5xx']} "
          f"sqlite_stuck={sqlite['stuck']} wall_s={time.monotonic() - started:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
