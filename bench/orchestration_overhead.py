"""Orchestration overhead: the default pipeline through the Prefect flow vs the task functions called directly.

Both run the same steps (prepare -> train -> convert -> evaluate -> register) on the bundled data with
params.yaml, each in a fresh Python process (imports included), each into its own scratch workspace and
a scratch MLflow SQLite store. The flow run talks to a real Prefect server started for the benchmark by
scripts/services.py. Target: ``prefect_overhead_ratio`` (flow wall time / direct wall time) <= 1.15.

    .venv/bin/python bench/orchestration_overhead.py

Last line: ``prefect_overhead_ratio=<x> flow_s=<s> direct_s=<s>``.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from scripts import services  # noqa: E402

DIRECT = """
from pathlib import Path
from flows.parameters import DEFAULT_PARAMETERS, resolve
from tasks import convert, data, evaluate, registry, tracking, train
config = resolve(DEFAULT_PARAMETERS, {workspace!r})
tracking.configure(config.mlflow)
data.prepare(config.data, config.seed)
prepared = data.load_prepared(Path(config.data.output_dir))
train.train(config, prepared)
convert.convert_all(config, prepared)
evaluate.evaluate(config, Path("devices.yaml"))
registry.register(config)
"""

FLOW = """
from flows.training import training
training(workspace={workspace!r})
"""


def timed(code: str, env: dict[str, str]) -> float:
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if completed.returncode != 0:
        raise SystemExit(f"run failed:\n{completed.stdout[-2000:]}\n{completed.stderr[-4000:]}")
    return elapsed


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="edgeloop-overhead-") as scratch:
        root = Path(scratch)
        port = free_port()
        services.start_prefect(root / "services", port, schedules=False)
        try:
            env = {**os.environ, **services.prefect_env(root / "services" / "prefect", port),
                   "PYTHONPATH": str(REPO_ROOT)}
            direct_s = timed(DIRECT.format(workspace=str(root / "direct")),
                             {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'direct.db'}"})
            flow_s = timed(FLOW.format(workspace=str(root / "flow")),
                           {**env, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'flow.db'}"})
        finally:
            services.stop("prefect-server", root / "services")
    print(f"direct task calls: {direct_s:.1f} s")
    print(f"Prefect flow:      {flow_s:.1f} s")
    print(f"prefect_overhead_ratio={flow_s / direct_s:.3f} flow_s={flow_s:.1f} direct_s={direct_s:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
