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
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from edge.bench.probes import EnergyMeter, describe_environment
from edge.serving.thermal import read_celsius

SCHEMA_VERSION = "edgeloop.bench/1"


class BenchError(Exception):
    """Bad benchmark input (missing file, bad option): one clear message, exit code 2."""


@dataclass(frozen=True)
class BenchConfig:
    """One runtime configuration to measure every model with."""

    name: str = "default"
    threads: int | None = None           # None: the runtime's default
    xnnpack: bool = True                  # LiteRT's XNNPACK delegate
    providers: tuple[str, ...] = ("CPUExecutionProvider",)  # ONNX Runtime, in order of preference


@dataclass(frozen=True)
class BenchJob:
    """What to measure: model files, an optional labelled eval set, the phases' run counts and sensors."""

    models: tuple[str, ...]
    eval_set: str | None = None
    eval_limit: int | None = None
    iterations: int = 200
    warmup: int = 20
    configs: tuple[BenchConfig, ...] = (BenchConfig(),)
    rates: tuple[float, ...] = ()
    rate_seconds: float = 2.0
    timeout_s: float = 600.0              # per model and configuration
    thermal_sensor: str = "/sys/class/thermal/thermal_zone0/temp"
    thermal_limit_c: float | None = None
    energy_counter: str | None = None     # cumulative microjoules; None: RAPL when readable
    power_sensor: str | None = None       # instantaneous microwatts (hwmon power*_input, INA219)
    emulated: bool = False
    device: str | None = None

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BenchJob:
        if not isinstance(raw, dict):
            raise BenchError(f"a job must be a JSON object, got {type(raw).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise BenchError(f"unknown job key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}")
        values = dict(raw)
        try:
            values["models"] = tuple(str(m) for m in values.get("models") or ())
            values["configs"] = tuple(BenchConfig(**{**c, "providers": tuple(c.get("providers") or
                                                                             BenchConfig.providers)})
                                      for c in values.get("configs") or [{}])
            values["rates"] = tuple(float(r) for r in values.get("rates") or ())
            job = cls(**values)
        except (TypeError, ValueError) as error:
            raise BenchError(f"bad job: {error}") from None
        job.validate()
        return job

    def validate(self) -> None:
        if not self.models:
            raise BenchError("no model files given")
        if self.iterations < 1 or self.warmup < 0:
            raise BenchError(f"iterations must be >= 1 and warmup >= 0 (got {self.iterations}, {self.warmup})")
        if any(rate <= 0 for rate in self.rates) or self.rate_seconds <= 0:
            raise BenchError("rates and rate_seconds must be positive")
        if self.timeout_s <= 0:
            raise BenchError("timeout_s must be positive")
        names = [c.name for c in self.configs]
        if len(set(names)) != len(names):
            raise BenchError(f"configuration names must be unique, got {names}")
        for config in self.configs:
            if config.threads is not None and config.threads < 1:
                raise BenchError(f"configuration {config.name!r}: threads must be >= 1")
        if self.eval_set is not None and not Path(self.eval_set).is_file():
            raise BenchError(f"eval set {self.eval_set} not found")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- one model, one configuration (in a child process) --------------------------------------------

def _timed(call, argument, runs: int) -> list[float]:
    """Milliseconds of each of ``runs`` calls ``call(argument)``."""
    timings = []
    for _ in range(runs):
        began = time.perf_counter()
        call(argument)
        timings.append((time.perf_counter() - began) * 1000.0)
    return timings


def latency_stats(timings_ms: list[float]) -> dict[str, float]:
    import numpy as np

    values = np.asarray(timings_ms, dtype=np.float64)
    stats = {f"p{q}_ms": float(np.percentile(values, q)) for q in (50, 90, 95, 99)}
    return {**stats, "max_ms": float(values.max()), "min_ms": float(values.min()), "mean_ms": float(values.mean()),
            "std_ms": float(values.std()), "runs": int(values.size)}


def _input_and_eval(model, job: BenchJob):
    import numpy as np

    if job.eval_set is None:
        shape = [1 if d == -1 else d for d in model.input.shape]
        return np.random.default_rng(0).random(shape, dtype=np.float32), None, None
    with np.load(job.eval_set) as data:
        if "x" not in data:
            raise BenchError(f"eval set {job.eval_set} has no 'x' array (expected x and optionally y)")
        x = data["x"].astype(np.float32)
        y = data["y"] if "y" in data else None
    if job.eval_limit:
        x, y = x[:job.eval_limit], (y[:job.eval_limit] if y is not None else None)
    if len(x) == 0:
        raise BenchError(f"eval set {job.eval_set} is empty")
    return x[:1], x, y


def _rate_sweep(model, sample, job: BenchJob) -> list[dict[str, Any]]:
    """Latency, CPU use and energy at fixed inference rates (paced, not back to back)."""
    sweep = []
    for rate in job.rates:
        interval = 1.0 / rate
        meter, _ = EnergyMeter.find(job.energy_counter, job.power_sensor)
        timings: list[float] = []
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        if meter:
            meter.start()
        next_at, starts = wall_start, []
        while time.perf_counter() - wall_start < job.rate_seconds:
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            began = time.perf_counter()
            model.predict(sample)
            timings.append((time.perf_counter() - began) * 1000.0)
            starts.append(began)
            next_at = max(next_at + interval, began)  # a slow call shifts the schedule, it never bursts
        wall = time.perf_counter() - wall_start
        achieved = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else len(starts) / wall
        joules = meter.stop() if meter else None
        stats = latency_stats(timings)
        sweep.append({"target_hz": rate, "achieved_hz": achieved, "p50_ms": stats["p50_ms"],
                      "p95_ms": stats["p95_ms"], "cpu_utilisation": (time.process_time() - cpu_start) / wall,
                      "saturated": stats["p50_ms"] >= interval * 1000.0,
                      "energy_per_inference_mj": 1000.0 * joules / len(timings) if joules is not None else None,
                      "average_power_w": joules / meter.seconds if joules is not None and meter.seconds else None})
    return sweep


def measure_one(model_path: str, config: BenchConfig, job: BenchJob) -> dict[str, Any]:
    """Every figure of one model file in one configuration, in this (fresh) process."""
    try:
        import numpy as np
    except ImportError:
        raise BenchError("numpy is not installed for this Python on the device: install the edge runtime "
                         "(pip install numpy ai-edge-litert or onnxruntime) or point runner.python at one") from None

    suffix = Path(model_path).suffix
    runtime_module = {".tflite": "ai_edge_litert.interpreter", ".onnx": "onnxruntime"}.get(suffix)
    if runtime_module is None:
        raise BenchError(f"{model_path}: unknown model format {suffix!r}; expected .tflite or .onnx")
    if not Path(model_path).is_file():
        raise BenchError(f"{model_path}: model file not found")
    from edge.bench.measure import current_rss_bytes, peak_rss_bytes

    baseline = current_rss_bytes()
    started = time.perf_counter()
    try:
        __import__(runtime_module)
    except ImportError as error:
        raise BenchError(f"the {suffix[1:]} runtime is not installed on this device ({error})") from None
    from edge.runtime import EdgeModel, RuntimeOptions

    import_ms = (time.perf_counter() - started) * 1000.0
    preload = current_rss_bytes()
    cpu_start = time.process_time()
    started = time.perf_counter()
    options = RuntimeOptions(xnnpack=config.xnnpack, onnx_providers=tuple(config.providers))
    model = EdgeModel.load(model_path, num_threads=config.threads, options=options)
    init_ms = (time.perf_counter() - started) * 1000.0
    init = current_rss_bytes()
    sample, eval_x, eval_y = _input_and_eval(model, job)
    started = time.perf_counter()
    model.predict(sample)
    first_ms = (time.perf_counter() - started) * 1000.0
    warmup = _timed(model.predict, sample, job.warmup)
    sensor = Path(job.thermal_sensor)
    temperature_before = read_celsius(sensor)[0]
    meter, energy_source = EnergyMeter.find(job.energy_counter, job.power_sensor)
    if meter:
        meter.start()
    feed = model.prepare(np.asarray(sample, np.float32))
    loop_start = time.perf_counter()
    timings = _timed(model.invoke, feed, job.iterations)  # the runtime alone, as benchmark_model times it
    loop_s = time.perf_counter() - loop_start
    joules = meter.stop() if meter else None
    temperature_after = read_celsius(sensor)[0]
    end_to_end = _timed(model.predict, sample, job.iterations)  # plus input checks and (de)quantization
    accuracy = predictions = None
    if eval_x is not None:
        predicted = np.argmax(model.predict(eval_x), axis=1)
        predictions = [int(p) for p in predicted]
        accuracy = float(np.mean(predicted == eval_y)) if eval_y is not None else None
    sweep = _rate_sweep(model, sample, job) if job.rates else []
    peak = max(peak_rss_bytes(), current_rss_bytes())
    requested = [p for p in config.providers if p != "CPUExecutionProvider"] if model.runtime == "onnx" else (
        ["XNNPACK"] if config.xnnpack else [])
    hottest = max((t for t in (temperature_before, temperature_after) if t is not None), default=None)
    return {
        "runtime": model.runtime, "accelerators": model.accelerators,
        "fallback": [name for name in requested if name not in model.accelerators],
        "size_bytes": Path(model_path).stat().st_size,
        "phases": {"runtime_import_ms": import_ms, "init_ms": init_ms, "first_inference_ms": first_ms,
                   "warmup_mean_ms": float(np.mean(warmup)) if warmup else None, "warmup_runs": len(warmup)},
        "latency": latency_stats(timings),
        "end_to_end": {key: value for key, value in latency_stats(end_to_end).items()
                       if key in ("p50_ms", "p95_ms", "mean_ms")},
        "throughput_ips": job.iterations / loop_s,
        "memory": {"baseline_rss_bytes": baseline, "preload_rss_bytes": preload, "init_rss_bytes": init,
                   "peak_rss_bytes": peak, "peak_growth_bytes": max(0, peak - preload)},
        "cpu_time_s": time.process_time() - cpu_start,
        "accuracy": accuracy, "eval_samples": None if eval_x is None else len(eval_x), "predictions": predictions,
        "thermal": {"sensor": str(sensor), "before_c": temperature_before, "after_c": temperature_after,
                    "limit_c": job.thermal_limit_c,
                    "throttled": (hottest >= job.thermal_limit_c) if hottest is not None and job.thermal_limit_c
                    else None},
        "energy": {"source": energy_source if meter else None,
                   "reason": None if meter and joules is not None else energy_source if not meter
                   else "the sensor gave no usable readings",
                   "joules": joules, "seconds": meter.seconds if meter and joules is not None else None,
                   "per_inference_mj": 1000.0 * joules / job.iterations if joules is not None else None},
        "rate_sweep": sweep,
    }


# ---- the parent: one child per (model, configuration) ----------------------------------------------

def _child_command(model: str, config: BenchConfig, job_path: Path) -> list[str]:
    return [sys.executable, "-m", "edge.bench", "--child", model, "--child-config", config.name, "--job", str(job_path)]


def _failure(returncode: int, stderr: str) -> str:
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory: the model does not fit the memory limit)" if -returncode == signal.SIGKILL else ""
        return f"the benchmark process was killed by {name}{hint}"
    last = [line for line in stderr.strip().splitlines() if line.strip()]
    return last[-1][:500] if last else f"the benchmark process exited with code {returncode}"


def run_isolated(model: str, config: BenchConfig, job: BenchJob, job_path: Path) -> dict[str, Any]:
    """:func:`measure_one` in a fresh process; an error row when it fails, is killed or runs too long."""
    row: dict[str, Any] = {"model": Path(model).name, "config": asdict(config) | {"providers": list(config.providers)}}
    started = time.perf_counter()
    try:
        completed = subprocess.run(_child_command(model, config, job_path), capture_output=True, text=True,
                                   timeout=job.timeout_s)
    except subprocess.TimeoutExpired:
        return row | {"status": "error", "error": f"timed out after {job.timeout_s:.0f} s"}
    finally:
        row["wall_s"] = time.perf_counter() - started
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        return row | {"status": "error", "error": _failure(completed.returncode, completed.stderr)}
    return row | {"status": "ok", "error": None, **json.loads(lines[-1])}


def applies(config: BenchConfig, model: str) -> bool:
    """Whether ``config`` means anything for ``model``'s runtime: XNNPACK switches are LiteRT's, execution
    providers ONNX Runtime's; the first configuration always runs."""
    if Path(model).suffix == ".onnx":
        return config.xnnpack
    return tuple(config.providers) == BenchConfig.providers


def run_job(job: BenchJob) -> dict[str, Any]:
    """The whole document: environment, settings and one result row per (model, configuration)."""
    job.validate()
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as scratch:
        job_path = Path(scratch) / "job.json"
        job_path.write_text(json.dumps(job.to_dict()))
        results = [run_isolated(model, config, job, job_path) for model in job.models
                   for index, config in enumerate(job.configs) if index == 0 or applies(config, model)]
    return {"schema": SCHEMA_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "environment": describe_environment(job.emulated, job.device),
            "settings": {k: v for k, v in job.to_dict().items() if k != "models"},
            "results": results}


def write_json(document: dict[str, Any], out: Path | None) -> None:
    text = json.dumps(document, indent=2) + "\n"
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial")
    temporary.write_text(text)
    os.replace(temporary, out)  # readers never see half a file


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
