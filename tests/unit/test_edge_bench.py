"""``python -m edge.bench``: the on-device benchmark, run for real on the tiny models (child processes and all)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO_ROOT


def _bench(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge.bench", *args], capture_output=True, text=True, timeout=300,
                          cwd=cwd or REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})})


@pytest.fixture(scope="module")
def measured(tiny_model_files, digits, tmp_path_factory):
    """One benchmark of the int8 models with an eval set, a rate sweep, a 2 W power sensor and a hot sensor."""
    root = tmp_path_factory.mktemp("edge-bench")
    np.savez(root / "eval.npz", x=digits.x[:120], y=digits.y[:120])
    (root / "power").write_text("2000000\n")      # µW, as hwmon's power1_input
    (root / "temp").write_text("91000\n")         # m°C, over the 85 °C limit
    out = root / "result.json"
    completed = _bench(str(tiny_model_files["tflite_int8"]), str(tiny_model_files["onnx_int8"]), "--eval",
                       str(root / "eval.npz"), "--iterations", "150", "--warmup", "5", "--threads", "1",
                       "--rates", "40", "--rate-seconds", "0.5", "--power-sensor", str(root / "power"),
                       "--thermal-sensor", str(root / "temp"), "--thermal-limit-c", "85", "--out", str(out))
    assert completed.returncode == 0, completed.stderr
    return json.loads(out.read_text())


def test_the_document_follows_its_json_schema(measured):
    import jsonschema

    schema = json.loads((REPO_ROOT / "edge" / "bench" / "schema.json").read_text())
    jsonschema.validate(measured, schema)
    assert measured["environment"]["arch"] == os.uname().machine and measured["environment"]["emulated"] is False
    assert [row["status"] for row in measured["results"]] == ["ok", "ok"]


def test_accuracy_and_labels_are_measured_on_the_device(measured, tiny_model_files, digits):
    from edge.runtime import EdgeModel

    for row, name in zip(measured["results"], ("tflite_int8", "onnx_int8")):
        labels = np.argmax(EdgeModel.load(tiny_model_files[name]).predict(digits.x[:120]), axis=1)
        assert row["predictions"] == labels.tolist()
        assert row["accuracy"] == pytest.approx(float(np.mean(labels == digits.y[:120])))
        assert row["eval_samples"] == 120


def test_phases_latency_and_memory_are_consistent(measured):
    for row in measured["results"]:
        latency, memory = row["latency"], row["memory"]
        assert latency["runs"] == 150 and row["phases"]["warmup_runs"] == 5
        assert latency["min_ms"] <= latency["p50_ms"] <= latency["p90_ms"] <= latency["p95_ms"] <= latency["p99_ms"]
        assert latency["p99_ms"] <= latency["max_ms"] and latency["std_ms"] >= 0
        # the timed loop encloses every timed run, so throughput never exceeds what the runs' mean allows
        assert 0 < row["throughput_ips"] <= 1000.0 / latency["mean_ms"] * (1 + 1e-9)
        assert memory["baseline_rss_bytes"] < memory["preload_rss_bytes"] <= memory["peak_rss_bytes"]
        assert memory["peak_growth_bytes"] == memory["peak_rss_bytes"] - memory["preload_rss_bytes"]
        assert row["cpu_time_s"] > 0 and row["phases"]["init_ms"] > 0


def test_energy_comes_from_the_sensor_and_the_sweep_is_reported(measured):
    for row in measured["results"]:
        energy = row["energy"]
        assert "power sensor" in energy["source"] and energy["reason"] is None
        loop_s = row["latency"]["runs"] / row["throughput_ips"]
        assert energy["seconds"] >= 0.99 * loop_s  # the window covers the timed loop
        assert energy["joules"] / energy["seconds"] == pytest.approx(2.0, rel=1e-6)  # 2 W, integrated
        assert energy["per_inference_mj"] == pytest.approx(1000.0 * energy["joules"] / row["latency"]["runs"])
        # figures only, no timing targets (a loaded host runs slower): the pacing is tested below
        (rate,) = row["rate_sweep"]
        assert rate["target_hz"] == 40 and rate["achieved_hz"] > 0
        assert rate["average_power_w"] == pytest.approx(2.0, rel=1e-6) and rate["energy_per_inference_mj"] > 0
        assert rate["saturated"] == (rate["p50_ms"] >= 1.0 / 40 * 1000.0)  # p50 at or over the interval
        assert row["thermal"] == {"sensor": row["thermal"]["sensor"], "before_c": 91.0, "after_c": 91.0,
                                  "limit_c": 85.0, "throttled": True}


def test_the_rate_sweep_paces_calls_and_never_runs_faster_than_asked():
    from edge.bench.job import BenchJob
    from edge.bench.phases import _rate_sweep

    calls: list[float] = []

    class Model:  # records when each inference starts
        def predict(self, sample):
            calls.append(time.perf_counter())

    rate = 100.0
    job = BenchJob(models=("m.tflite",), rates=(rate,), rate_seconds=0.5)
    started = time.perf_counter()
    (row,) = _rate_sweep(Model(), None, job)
    elapsed = time.perf_counter() - started
    assert row["target_hz"] == rate and calls
    # upper bounds on speed only, which no load can break: call k starts no earlier than k intervals after the
    # sweep began (a late call shifts the schedule, it never catches up in a burst), so the count is bounded too
    assert all(at >= started + k / rate - 1e-6 for k, at in enumerate(calls))
    assert len(calls) <= 1 + rate * elapsed
    if len(calls) >= 3:  # the first call may start late and the second on time: one interval of slack
        assert row["achieved_hz"] <= rate * (len(calls) - 1) / (len(calls) - 2) * (1 + 1e-6)


def test_without_a_sensor_energy_is_null_with_the_reason(tiny_model_files, tmp_path):
    out = tmp_path / "r.json"
    completed = _bench(str(tiny_model_files["tflite_fp32"]), "--iterations", "5", "--energy-counter",
                       str(tmp_path / "missing_energy_uj"), "--thermal-sensor", str(tmp_path / "none"), "--out",
                       str(out))
    assert completed.returncode == 0, completed.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["energy"]["joules"] is None and "not readable" in row["energy"]["reason"]
    assert row["thermal"]["before_c"] is None and row["thermal"]["throttled"] is None
    assert row["accuracy"] is None and row["predictions"] is None  # no eval set: random input, no accuracy


def test_delegates_and_providers_are_reported_with_fallbacks(tiny_model_files, tmp_path):
    job = {"models": [str(tiny_model_files["tflite_int8"]), str(tiny_model_files["onnx_fp32"])], "iterations": 5,
           "warmup": 0, "configs": [{"name": "default"}, {"name": "no-xnnpack", "xnnpack": False},
                                    {"name": "cuda", "providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    completed = _bench("--job", "job.json", "--out", "r.json", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    rows = {(Path(r["model"]).stem, r["config"]["name"]): r for r in results}
    # each option only where it means something: XNNPACK for LiteRT, providers for ONNX Runtime
    assert set(rows) == {("tflite_int8", "default"), ("tflite_int8", "no-xnnpack"), ("onnx_fp32", "default"),
                         ("onnx_fp32", "cuda")}
    assert rows["tflite_int8", "default"]["accelerators"] == ["XNNPACK"]
    assert rows["tflite_int8", "no-xnnpack"]["accelerators"] == []
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():  # this CPU build: falls back
        assert rows["onnx_fp32", "cuda"]["fallback"] == ["CUDAExecutionProvider"]
        assert rows["onnx_fp32", "cuda"]["accelerators"] == []


def test_a_corrupt_model_and_a_missing_runtime_are_error_rows(tiny_model_files, tmp_path):
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"not a flatbuffer" * 10)
    fake = tmp_path / "no_onnx" / "onnxruntime"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('onnxruntime is not installed here')\n")
    out = tmp_path / "r.json"
    completed = _bench(str(corrupt), str(tiny_model_files["onnx_int8"]), str(tiny_model_files["tflite_int8"]),
                       "--iterations", "5", "--out", str(out),
                       env={"PYTHONPATH": f"{tmp_path / 'no_onnx'}{os.pathsep}{REPO_ROOT}"})
    assert completed.returncode == 0, completed.stderr
    corrupt_row, onnx_row, good_row = json.loads(out.read_text())["results"]
    assert corrupt_row["status"] == "error" and "corrupt or truncated" in corrupt_row["error"]
    assert onnx_row["status"] == "error" and "onnx runtime is not installed on this device" in onnx_row["error"]
    assert good_row["status"] == "ok"


@pytest.mark.parametrize(("args", "message"), [
    ([], "no model files given"),
    (["m.tflite", "--iterations", "0"], "iterations must be >= 1"),
    (["m.tflite", "--eval", "missing.npz"], "eval set missing.npz not found"),
    (["m.tflite", "--rates", "5,fast"], "--rates must be numbers"),
    (["--job", "missing.json"], "cannot read job file"),
])
def test_bad_input_is_one_clear_error(args, message, tmp_path):
    completed = _bench(*args, cwd=tmp_path)
    assert completed.returncode == 2 and message in completed.stderr and "Traceback" not in completed.stderr


def test_an_unknown_job_key_is_named(tmp_path):
    (tmp_path / "job.json").write_text(json.dumps({"models": ["m.tflite"], "iteratons": 5}))
    completed = _bench("--job", "job.json", cwd=tmp_path)
    assert completed.returncode == 2 and "unknown job key(s) iteratons" in completed.stderr
