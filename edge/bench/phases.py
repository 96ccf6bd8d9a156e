"""One model file in one configuration, measured phase by phase; runs in a fresh child process.

Phases follow TFLite's ``benchmark_model``: runtime import, initialisation (load + allocate), the first
(cold) inference, warm-up runs, then timed steady-state runs of the runtime alone on a prepared input;
``end_to_end`` adds what the edge service does around it (input checks, quantization and dequantization).
numpy and the runtimes are imported here, inside the functions, so the import is itself measured and a
device without them gets a :class:`BenchError` that says what to install.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from edge.bench.job import BenchConfig, BenchError, BenchJob
from edge.bench.probes import EnergyMeter
from edge.serving.thermal import read_celsius


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


def _paced_timings(model, sample, rate: float, seconds: float) -> tuple[list[float], list[float]]:
    """Milliseconds of each call and when each began, calling ``model.predict`` ``rate`` times a second."""
    interval = 1.0 / rate
    timings: list[float] = []
    wall_start = time.perf_counter()
    next_at, starts = wall_start, []
    while time.perf_counter() - wall_start < seconds:
        delay = next_at - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        began = time.perf_counter()
        model.predict(sample)
        timings.append((time.perf_counter() - began) * 1000.0)
        starts.append(began)
        next_at = max(next_at + interval, began)  # a slow call shifts the schedule, it never bursts
    return timings, starts


def _rate_sweep(model, sample, job: BenchJob) -> list[dict[str, Any]]:
    """Latency, CPU use and energy at fixed inference rates (paced, not back to back)."""
    sweep = []
    for rate in job.rates:
        interval = 1.0 / rate
        meter, _ = EnergyMeter.find(job.energy_counter, job.power_sensor)
        cpu_start, wall_start = time.process_time(), time.perf_counter()
        if meter:
            meter.start()
        timings, starts = _paced_timings(model, sample, rate, job.rate_seconds)
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


def _runtime_module(model_path: str) -> str:
    """The runtime ``model_path`` needs, once numpy and the file are known to be there."""
    try:
        import numpy  # noqa: F401
    except ImportError:
        raise BenchError("numpy is not installed for this Python on the device: install the edge runtime "
                         "(pip install numpy ai-edge-litert or onnxruntime) or point runner.python at one") from None
    from edge.runtime import RUNTIME_BY_SUFFIX, module_for  # numpy, which it imports, is known to be there now

    suffix = Path(model_path).suffix
    if suffix not in RUNTIME_BY_SUFFIX:
        raise BenchError(f"{model_path}: unknown model format {suffix!r}; expected .tflite or .onnx")
    runtime_module = module_for(suffix)
    if runtime_module is None:
        raise BenchError(f"the {RUNTIME_BY_SUFFIX[suffix]} runtime is not installed on this device (pip install "
                         "ai-edge-litert, tflite-runtime on armv7, or onnxruntime)")
    if not Path(model_path).is_file():
        raise BenchError(f"{model_path}: model file not found")
    return runtime_module


def _load(model_path: str, config: BenchConfig, memory: dict[str, int]) -> tuple[Any, dict[str, Any], float]:
    """Import the runtime and load the model: the model, the import and init phases, and the CPU clock at load.

    ``memory`` gains the RSS before the load and after it.
    """
    runtime_module = _runtime_module(model_path)
    from edge.bench.measure import current_rss_bytes  # numpy, which it needs, is known to be there now

    memory["baseline_rss_bytes"] = current_rss_bytes()
    started = time.perf_counter()
    try:
        __import__(runtime_module)
    except ImportError as error:
        raise BenchError(f"the {Path(model_path).suffix[1:]} runtime is not installed on this device ({error})") \
            from None
    from edge.runtime import EdgeModel, RuntimeOptions

    import_ms = (time.perf_counter() - started) * 1000.0
    memory["preload_rss_bytes"] = current_rss_bytes()
    cpu_start = time.process_time()
    started = time.perf_counter()
    options = RuntimeOptions(xnnpack=config.xnnpack, onnx_providers=tuple(config.providers))
    model = EdgeModel.load(model_path, num_threads=config.threads, options=options)
    init_ms = (time.perf_counter() - started) * 1000.0
    memory["init_rss_bytes"] = current_rss_bytes()
    return model, {"runtime_import_ms": import_ms, "init_ms": init_ms}, cpu_start


def _cold_and_warmup(model, sample, job: BenchJob) -> dict[str, Any]:
    """The first (cold) inference and the warm-up runs."""
    import numpy as np

    started = time.perf_counter()
    model.predict(sample)
    first_ms = (time.perf_counter() - started) * 1000.0
    warmup = _timed(model.predict, sample, job.warmup)
    return {"first_inference_ms": first_ms, "warmup_mean_ms": float(np.mean(warmup)) if warmup else None,
            "warmup_runs": len(warmup)}


def _energy(meter: EnergyMeter | None, source: str, joules: float | None, inferences: int) -> dict[str, Any]:
    """The ``energy`` section: measured figures, or null with the reason."""
    return {"source": source if meter else None,
            "reason": None if meter and joules is not None else source if not meter
            else "the sensor gave no usable readings",
            "joules": joules, "seconds": meter.seconds if meter and joules is not None else None,
            "per_inference_mj": 1000.0 * joules / inferences if joules is not None else None}


def _steady_state(model, sample, job: BenchJob) -> dict[str, Any]:
    """Timed runs of the runtime alone (set input, invoke, read output), with temperature and energy around them."""
    import numpy as np

    sensor = Path(job.thermal_sensor)
    before = read_celsius(sensor)[0]
    meter, energy_source = EnergyMeter.find(job.energy_counter, job.power_sensor)
    if meter:
        meter.start()
    feed = model.prepare(np.asarray(sample, np.float32))
    loop_start = time.perf_counter()
    timings = _timed(model.invoke, feed, job.iterations)  # the runtime alone, as benchmark_model times it
    loop_s = time.perf_counter() - loop_start
    joules = meter.stop() if meter else None
    after = read_celsius(sensor)[0]
    hottest = max((t for t in (before, after) if t is not None), default=None)
    throttled = (hottest >= job.thermal_limit_c) if hottest is not None and job.thermal_limit_c else None
    return {"latency": latency_stats(timings), "throughput_ips": job.iterations / loop_s,
            "thermal": {"sensor": str(sensor), "before_c": before, "after_c": after, "limit_c": job.thermal_limit_c,
                        "throttled": throttled},
            "energy": _energy(meter, energy_source, joules, job.iterations)}


def _accuracy(model, eval_x, eval_y) -> tuple[float | None, list[int] | None]:
    """Accuracy on the eval set (None without labels) and every prediction (None without an eval set)."""
    import numpy as np

    if eval_x is None:
        return None, None
    predicted = np.argmax(model.predict(eval_x), axis=1)
    return (float(np.mean(predicted == eval_y)) if eval_y is not None else None), [int(p) for p in predicted]


def _fallback(model, config: BenchConfig) -> list[str]:
    """The accelerators asked for that the runtime did not use."""
    requested = [p for p in config.providers if p != "CPUExecutionProvider"] if model.runtime == "onnx" else (
        ["XNNPACK"] if config.xnnpack else [])
    return [name for name in requested if name not in model.accelerators]


def measure_one(model_path: str, config: BenchConfig, job: BenchJob) -> dict[str, Any]:
    """Every figure of one model file in one configuration, in this (fresh) process."""
    memory: dict[str, int] = {}
    model, phases, cpu_start = _load(model_path, config, memory)
    sample, eval_x, eval_y = _input_and_eval(model, job)
    phases |= _cold_and_warmup(model, sample, job)
    steady = _steady_state(model, sample, job)
    end_to_end = _timed(model.predict, sample, job.iterations)  # plus input checks and (de)quantization
    accuracy, predictions = _accuracy(model, eval_x, eval_y)
    sweep = _rate_sweep(model, sample, job) if job.rates else []
    from edge.bench.measure import current_rss_bytes, peak_rss_bytes

    peak = max(peak_rss_bytes(), current_rss_bytes())
    memory |= {"peak_rss_bytes": peak, "peak_growth_bytes": max(0, peak - memory["preload_rss_bytes"])}
    return {
        "runtime": model.runtime, "accelerators": model.accelerators, "fallback": _fallback(model, config),
        "size_bytes": Path(model_path).stat().st_size, "phases": phases, "latency": steady["latency"],
        "end_to_end": {key: value for key, value in latency_stats(end_to_end).items()
                       if key in ("p50_ms", "p95_ms", "mean_ms")},
        "throughput_ips": steady["throughput_ips"], "memory": memory, "cpu_time_s": time.process_time() - cpu_start,
        "accuracy": accuracy, "eval_samples": None if eval_x is None else len(eval_x), "predictions": predictions,
        "thermal": steady["thermal"], "energy": steady["energy"], "rate_sweep": sweep,
    }
