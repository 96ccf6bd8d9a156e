"""int8 vs float32 on LiteRT: ``resnet8`` on 32x32x3 inputs, single thread, XNNPACK, through ``edge.bench``.

Both files come from the same Keras model (random weights: timing only); full-integer int8 uses
uniform-noise representative data. Five edge.bench runs per file (alternating, each a fresh process);
the ratio of the median p50s. Target: at least 2x (the TFLite documentation says 1.5-4x).

    .venv/bin/python bench/int8_speedup.py [--runs 5] [--iterations 1000]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _bench_models import edge_bench_p50, resnet8_files  # noqa: E402  (bench/_bench_models.py, beside this script)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        files = resnet8_files(Path(scratch))
        fp32, int8 = [], []
        for run in range(args.runs):
            p50_fp32, p50_int8 = edge_bench_p50([files["fp32"], files["int8"]], args.iterations, args.warmup)
            fp32.append(p50_fp32)
            int8.append(p50_int8)
            print(f"run {run + 1}: fp32 p50 {p50_fp32:.4f} ms, int8 p50 {p50_int8:.4f} ms")
        sizes = {name: path.stat().st_size for name, path in files.items()}
    speedup = statistics.median(fp32) / statistics.median(int8)
    print(f"fp32 {statistics.median(fp32):.4f} ms ({sizes['fp32']} B), int8 {statistics.median(int8):.4f} ms "
          f"({sizes['int8']} B)")
    print(f"int8_speedup={speedup:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
