"""int8 vs float32 per runtime on this CPU: ``resnet8`` on 32x32x3 inputs, single thread, through ``edge.bench``.

One Keras model (random weights: timing only) exported as LiteRT float32 and full-integer int8, and as ONNX
float32 and int8 QDQ in two schemes: S8S8 and U8S8 with ``reduce_range`` (ONNX Runtime's advice for x86
without VNNI). Measured: LiteRT with XNNPACK and without it (the builtin kernels), ONNX Runtime (CPU
provider). Each configuration's models run in one edge.bench call (a fresh child process each), ``--runs``
times; the figures are medians of the p50s. Whether int8 pays depends on the CPU: XNNPACK's int8 kernels are
slower than its float ones on x86 without VNNI, and much faster with AVX-512 VNNI; the last line carries the
CPU flags that decide it.

    .venv/bin/python bench/int8_speedup.py [--runs 5] [--iterations 1000]

Last line: ``int8_speedup_litert=… int8_speedup_litert_no_xnnpack=… int8_speedup_ort_s8s8=…
int8_speedup_ort_u8s8_rr=… int8_speedup_ort=… best_int8_speedup=… best_fp32=… best_int8=… avx2=… ...``
(``int8_speedup_ort``: the faster ONNX scheme; ``best_int8_speedup``: the fastest float32 configuration's p50
over the fastest int8 one's, i.e. what int8 buys on this CPU against the best float choice).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import tempfile
from pathlib import Path

from _bench_models import cpu_flags, edge_bench_p50, resnet8_files, resnet8_onnx_files  # noqa: E402  (beside this)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=50)
    args = parser.parse_args()
    p50s: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tflite, onnx = resnet8_files(Path(scratch)), resnet8_onnx_files(Path(scratch))
        configurations = {  # name -> (models, edge.bench options, names of the figures)
            "litert": ([tflite["fp32"], tflite["int8"]], (), ("litert_fp32", "litert_int8")),
            "litert_no_xnnpack": ([tflite["fp32"], tflite["int8"]], ("--no-xnnpack",),
                                  ("litert_no_xnnpack_fp32", "litert_no_xnnpack_int8")),
            "ort": ([onnx["fp32"], onnx["s8s8"], onnx["u8s8_reduce_range"]], ("--providers", "CPUExecutionProvider"),
                    ("ort_fp32", "ort_s8s8", "ort_u8s8_rr")),
        }
        for run in range(args.runs):
            for models, extra, names in configurations.values():
                for name, p50 in zip(names, edge_bench_p50(models, args.iterations, args.warmup, extra=extra)):
                    p50s.setdefault(name, []).append(p50)
            print(f"run {run + 1}: " + ", ".join(f"{name} {values[-1]:.4f} ms" for name, values in p50s.items()))
    median = {name: statistics.median(values) for name, values in p50s.items()}
    for name, value in median.items():
        print(f"{name:24s} p50 {value:.4f} ms")
    speedups = {"litert": median["litert_fp32"] / median["litert_int8"],
                "litert_no_xnnpack": median["litert_no_xnnpack_fp32"] / median["litert_no_xnnpack_int8"],
                "ort_s8s8": median["ort_fp32"] / median["ort_s8s8"],
                "ort_u8s8_rr": median["ort_fp32"] / median["ort_u8s8_rr"]}
    speedups["ort"] = max(speedups["ort_s8s8"], speedups["ort_u8s8_rr"])
    best_fp32 = min((name for name in median if name.endswith("fp32")), key=median.get)
    best_int8 = min((name for name in median if not name.endswith("fp32")), key=median.get)
    flags = cpu_flags()
    print(f"CPU: {platform.processor() or platform.machine()}, "
          + ", ".join(name for name, present in flags.items() if present))
    print(" ".join([*(f"int8_speedup_{name}={value:.2f}" for name, value in speedups.items()),
                    f"best_int8_speedup={median[best_fp32] / median[best_int8]:.2f}", f"best_fp32={best_fp32}",
                    f"best_int8={best_int8}", *(f"{name}={present}" for name, present in flags.items())]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
