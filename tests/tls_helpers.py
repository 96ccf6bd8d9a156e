"""The mutual-TLS ingest and bundle service (``edgeloop ingest serve --ca-dir``) for the fleet tests."""

from __future__ import annotations

import sys
from pathlib import Path

from tasks.rollout.fleet_ca import FleetCa


def start_tls_ingest(run_dir: Path, ca: FleetCa, bundles: Path, collected: Path, host: str = "127.0.0.1") -> str:
    """Start the service on ``host`` (its certificate must name it) and return its ``https://HOST:PORT`` once it
    listens (its health route needs a client certificate, so the port is what is waited on)."""
    from tasks.stack import processes, services

    port = services.free_port()
    command = [sys.executable, "-m", "tasks.monitoring.ingest", "serve", "--ca-dir", str(ca.root),
               "--bundle-dir", str(bundles), "--collected-dir", str(collected), "--host", host, "--port", str(port)]
    service = services.start("ingest", command, run_dir, {}, None, f"https://{host}:{port}")
    processes.wait_listening("ingest", run_dir, service, port, 60)
    return f"https://{host}:{port}"
