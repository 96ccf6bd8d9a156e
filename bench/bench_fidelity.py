"""Fidelity of the on-device benchmark: ``edge.bench`` against a bare timing loop on the same model.

Both run ``resnet8`` int8 (32x32x3) on LiteRT with XNNPACK, one thread, the same iterations and warm-up,
each in a fresh process, alternating, five runs each. The bare loop is the least a benchmark can do:
set the input tensor, invoke, read the output, ``perf_counter`` around each call. Targets: the ratio of
the median p50s at most 1.05 (edge.bench adds no overhead of its own to what it times) and the coefficient
of variation of edge.bench's p50 over the runs at most 0.05 (repeatable).

    .venv/bin/python bench/bench_fidelity.py [--runs 5] [--iterations 2000]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench_models import edge_bench_p50, resnet8_files  # noqa: E402  (bench/_bench_models.py, beside this script)

BARE_LOOP = """
import sys, time
import numpy as np
from ai_edge_litert.interpreter import Interpreter
interpreter = Interpreter(model_path=sys.argv[1], num_threads=1)
interpreter.allocate_tensors()
detail, output = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
scale, zero = detail["quantization"]
x = np.random.default_rng(0).random(detail["shape"], dtype=np.float32)
feed = np.clip(np.round(x / scale) + zero, -128, 127).astype(detail["dtype"]) if scale else x.astype(detail["dtype"])
iterations, warmup = int(sys.argv[2]), int(sys.argv[3])
def once():
    interpreter.set_tensor(detail["index"], feed); interpreter.invoke(); interpreter.get_tensor(output["index"])
for _ in range(warmup + 1):
    once()
timings = []
for _ in range(iterations):
    began = time.perf_counter(); once(); timings.append((time.perf_counter() - began) * 1000.0)
print(float(np.percentile(timings, 50)))
"""


def bare_p50(model: Path, iterations: int, warmup: int) -> float:
    completed = subprocess.run([sys.executable, "-c", BARE_LOOP, str(model), str(iterations), str(warmup)],
                               check=True, capture_output=True, text=True)
    return float(completed.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        model = resnet8_files(Path(scratch))["int8"]
        bench, bare = [], []
        for run in range(args.runs):  # alternate, so drift in the machine's load hits both alike
            bench += edge_bench_p50([model], args.iterations, args.warmup)
            bare.append(bare_p50(model, args.iterations, args.warmup))
            print(f"run {run + 1}: edge.bench p50 {bench[-1]:.4f} ms, bare loop p50 {bare[-1]:.4f} ms")
    ratio = statistics.median(bench) / statistics.median(bare)
    cv = statistics.pstdev(bench) / statistics.mean(bench)
    print(f"edge.bench p50s {[round(v, 4) for v in bench]}; bare {[round(v, 4) for v in bare]}")
    print(f"bench_overhead_ratio={ratio:.3f} cv={cv:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
