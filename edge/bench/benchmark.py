"""On-device benchmark: ``python -m edge.bench`` (also ``edgeloop bench``) measures model files with the edge
runtime alone (numpy plus LiteRT or ONNX Runtime, nothing from the control plane).

Phases follow TFLite's ``benchmark_model`` so the numbers compare: runtime import, initialisation
(load + allocate), the first (cold) inference, warm-up runs, then timed steady-state runs of the runtime
alone on a prepared input (set input, invoke, read output); ``end_to_end`` adds what the edge service does
around it (input checks, quantization and dequantization). Each model
and configuration runs in a fresh child process, so its peak RSS is its own and a crash, an out-of-memory
kill or a hang becomes an error row instead of ending the benchmark. The output is one JSON document
described by ``edge/bench/schema.json`` (``schema``: ``edgeloop.bench/1``)::

    python -m edge.bench model.tflite [more.onnx ...] --eval eval.npz --iterations 200 --warmup 20 \\
        --threads 4 [--no-xnnpack] [--providers CUDAExecutionProvider] [--rates 5,20,50] --out result.json
    python -m edge.bench --job job.json --out result.json     # what the runners send

Energy per inference is reported only where a sensor exists: a cumulative energy counter in microjoules
(RAPL ``energy_uj``, found automatically) or a configured power sensor in microwatts (hwmon, INA219);
otherwise ``null`` with the reason, never an estimate. Runs under emulation (qemu) are marked
``emulated: true`` by the runner that starts them; their timings are not device timings.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

from edge.bench.document import run_job, write_json
from edge.bench.job import BenchConfig, BenchError, BenchJob
from edge.bench.phases import measure_one


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop bench", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="*", help=".tflite / .onnx files (a sidecar beside one is verified)")
    parser.add_argument("--job", type=Path, help="a job file (JSON) instead of the options below")
    parser.add_argument("--eval", dest="eval_set", help=".npz with x (and y for accuracy)")
    parser.add_argument("--eval-limit", type=int, help="use the first N eval samples")
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--threads", type=int, help="runtime threads (default: the runtime's choice)")
    parser.add_argument("--no-xnnpack", action="store_true", help="LiteRT without its XNNPACK delegate")
    parser.add_argument("--providers", help="ONNX Runtime providers, comma-separated, in order of preference")
    parser.add_argument("--rates", help="rate sweep: inferences per second, comma-separated (e.g. 5,20,50)")
    parser.add_argument("--rate-seconds", type=float, default=2.0, help="time per rate in the sweep")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="per model and configuration")
    parser.add_argument("--thermal-sensor", default=os.environ.get("EDGELOOP_THERMAL_SENSOR",
                                                                   "/sys/class/thermal/thermal_zone0/temp"))
    parser.add_argument("--thermal-limit-c", type=float, help="the device's throttle temperature")
    parser.add_argument("--energy-counter", help="cumulative energy counter in µJ (default: RAPL when readable)")
    parser.add_argument("--power-sensor", help="power sensor in µW (hwmon power1_input, INA219)")
    parser.add_argument("--emulated", action="store_true", default=os.environ.get("EDGELOOP_EMULATED") == "1",
                        help="mark the results as measured under emulation")
    parser.add_argument("--device", help="device name recorded in the environment")
    parser.add_argument("--out", type=Path, help="write the JSON here (atomically) instead of stdout")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-config", help=argparse.SUPPRESS)
    return parser


def _job_from_args(args: argparse.Namespace) -> BenchJob:
    if args.job:
        try:
            raw = json.loads(args.job.read_text())
        except (OSError, ValueError) as error:
            raise BenchError(f"cannot read job file {args.job}: {error}") from None
        job = BenchJob.from_dict(raw)
        return replace(job, emulated=True) if args.emulated and not job.emulated else job
    providers = tuple(p.strip() for p in args.providers.split(",") if p.strip()) if args.providers else None
    config = BenchConfig(threads=args.threads, xnnpack=not args.no_xnnpack,
                         providers=providers or BenchConfig.providers)
    try:
        rates = tuple(float(r) for r in args.rates.split(",")) if args.rates else ()
    except ValueError:
        raise BenchError(f"--rates must be numbers separated by commas, got {args.rates!r}") from None
    job = BenchJob(models=tuple(args.models), eval_set=args.eval_set, eval_limit=args.eval_limit,
                   iterations=args.iterations, warmup=args.warmup, configs=(config,), rates=rates,
                   rate_seconds=args.rate_seconds, timeout_s=args.timeout_s, thermal_sensor=args.thermal_sensor,
                   thermal_limit_c=args.thermal_limit_c, energy_counter=args.energy_counter,
                   power_sensor=args.power_sensor, emulated=args.emulated, device=args.device)
    job.validate()
    return job


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        job = _job_from_args(args)
        if args.child:  # one measurement, printed as the last line for the parent
            config = next(c for c in job.configs if c.name == args.child_config)
            print(json.dumps(measure_one(args.child, config, job)))
            return 0
        write_json(run_job(job), args.out)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a runtime refusing a file: the message, not a traceback
        print(f"error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
