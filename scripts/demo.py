"""``make demo``: the services, the nightly deployment run once on the bundled data, and the links to look at.

Starts (or reuses) a Prefect server, an MLflow server and a worker; a Docker engine and the image
registry when this machine can run them (root and Debian's ``docker.io``, see setup/system-packages.txt),
otherwise the run goes on without packaging and says why; creates the bundle signing key if missing;
deploys prefect.yaml; runs ``training/nightly`` through the worker; prints the UI links and the report.
The run's outputs go to the flows' workspace (``workspace/``), so the checkout stays clean.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from scripts.run_deployment import main as run_deployment
from tasks.stack import services

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def start_image_services(run_dir: Path, registry_port: int) -> str | None:
    """Start the engine and the registry; None when they can run, else why not (an error on CI)."""
    try:
        print(f"{'docker engine':15s} {services.start_docker_engine(run_dir)}")
        registry = services.start_registry(run_dir, registry_port)
        print(f"{registry.name:15s} pid {registry.pid:<7d} {registry.url}  (log {registry.log})")
    except services.ServiceError as error:
        if os.environ.get("CI", "").lower() == "true":
            raise
        return str(error)
    return None


def deploy(run_dir: Path) -> None:
    """``prefect deploy --all`` from the repository (its log: run_dir/deploy.log)."""
    log = run_dir / "deploy.log"
    with log.open("w") as handle:
        completed = subprocess.run([str(BIN / "prefect"), "--no-prompt", "deploy", "--all"], cwd=REPO_ROOT,
                                   env={**os.environ, "PWD": str(REPO_ROOT)}, stdout=handle, stderr=subprocess.STDOUT)
    if completed.returncode != 0:
        raise services.ServiceError(f"prefect deploy failed; see {log}:\n{services.log_tail(log)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    parser.add_argument("--prefect-port", type=int, default=4200)
    parser.add_argument("--mlflow-port", type=int, default=5000)
    parser.add_argument("--registry-port", type=int, default=int(os.environ.get("EDGELOOP_REGISTRY_PORT", 5050)))
    args = parser.parse_args(argv)
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{args.prefect_port}/api"
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from flows.parameters import FLOW_WORKSPACE
    from tasks.registry.bundle import generate_keypair
    from tasks.workspace import Workspace

    try:
        for service in services.up(args.run_dir, args.prefect_port, args.mlflow_port):
            print(f"{service.name:15s} pid {service.pid:<7d} {service.url}  (log {service.log})")
        why_not = start_image_services(args.run_dir, args.registry_port)
        if why_not is not None:
            print(f"\npackaging skipped: {why_not}\n(the images need a Docker engine: run `make demo` as root, or "
                  "install the packages setup/system-packages.sh names; the rest of the demo goes on)\n")
        elif not (REPO_ROOT / "keys" / "control-plane.key").exists():
            generate_keypair(REPO_ROOT / "keys", "control-plane")
            print("signing key     keys/control-plane.key (new; the private key never leaves this machine)")
        deploy(args.run_dir)
    except services.ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    status = run_deployment(["training/nightly", "--parameters", json.dumps({"package": why_not is None})])
    workspace = Workspace(FLOW_WORKSPACE)
    subprocess.run([str(BIN / "edgeloop"), "devices", "--out", str(workspace.devices_csv)], stdout=subprocess.DEVNULL,
                   check=False)
    print()
    print(f"Prefect UI:        http://127.0.0.1:{args.prefect_port}")
    print(f"MLflow UI:         http://127.0.0.1:{args.mlflow_port}")
    print(f"comparison report: {workspace.reports_dir / 'comparison.md'}")
    if why_not is not None:
        print("images:            not built (no Docker engine, see above)")
    print("state:             SQLite under .run/ (one person); for a team: `make down && make control-plane` "
          "(PostgreSQL), README 'Running it for a team'")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
