"""Orchestration overhead: the default pipeline through the Prefect flow vs the task functions called directly.

Both run the same steps (prepare -> train -> convert -> evaluate -> register) on the bundled data with
params.yaml, each in a fresh Python process (imports included), each into its own scratch workspace and
a scratch MLflow SQLite store. The flow run talks to a real Prefect server started for the benchmark by
tasks/stack/services.py. Target: ``prefect_overhead_ratio`` (flow wall time / direct wall time) <= 1.15.

    .venv/bin/python bench/orchestration_overhead.py

A throwaway process imports TensorFlow, Prefect and MLflow first, so neither side pays for a cold disk
cache; with ``--repeats N`` the two sides alternate (direct, flow, flow, direct, ...) and medians are
compared. Last line: ``prefect_overhead_ratio=<x> flow_s=<s> direct_s=<s>``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tasks.stack import services

REPO_ROOT = Path(__file__).resolve().parents[1]

DIRECT = """
from flows.parameters import DEFAULT_PARAMETERS, DEVICES_PATH, resolve
from tasks.contracts import read_prepared
from tasks.data.prepare import prepare
from tasks.evaluation.evaluate import evaluate
from tasks.model.convert import convert_all
from tasks.model.train import train
from tasks.registry.register import register
from tasks.registry.tracking import configure
config, workspace = resolve(DEFAULT_PARAMETERS, {workspace!r})
configure(config.mlflow)
prepare(config.data, config.seed, workspace)
summary = train(config, read_prepared(workspace), workspace)
conversions = convert_all(config, read_prepared(workspace), summary, workspace)
register(config, workspace, evaluate(config.evaluate, workspace, conversions, DEVICES_PATH), summary)
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


WARM_UP = "import tensorflow, tf_keras, tensorflow_model_optimization, prefect, mlflow, onnxruntime, tf2onnx"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="runs of each side (alternating order)")
    args = parser.parse_args()
    timings: dict[str, list[float]] = {"direct": [], "flow": []}
    with tempfile.TemporaryDirectory(prefix="edgeloop-overhead-") as scratch:
        root = Path(scratch)
        port = services.free_port()
        services.start_prefect(root / "services", port, schedules=False)
        try:
            env = {**os.environ, **services.prefect_env(root / "services" / "prefect", port)}
            timed(WARM_UP, env)
            for repeat in range(args.repeats):
                order = ("direct", "flow") if repeat % 2 == 0 else ("flow", "direct")
                for side in order:
                    code = (DIRECT if side == "direct" else FLOW).format(workspace=str(root / f"{side}{repeat}"))
                    store = f"sqlite:///{root / f'{side}{repeat}.db'}"
                    timings[side].append(timed(code, {**env, "MLFLOW_TRACKING_URI": store}))
        finally:
            services.stop("prefect-server", root / "services")
    direct_s, flow_s = statistics.median(timings["direct"]), statistics.median(timings["flow"])
    print(f"direct task calls: {', '.join(f'{t:.1f}' for t in timings['direct'])} s (median {direct_s:.1f})")
    print(f"Prefect flow:      {', '.join(f'{t:.1f}' for t in timings['flow'])} s (median {flow_s:.1f})")
    print(f"prefect_overhead_ratio={flow_s / direct_s:.3f} flow_s={flow_s:.1f} direct_s={direct_s:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
