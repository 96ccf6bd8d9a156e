"""On-device benchmarking through the runners, against real components started by the tests: cgroups on
this host (local runner), a real sshd on loopback (ssh runner), a real Prefect server with a real worker
on an ``edge-<device>`` pool (prefect runner). The docker runner is tested with the packaged images in
tests/integration/test_package.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.integration


def _device(name: str, **runner):
    from tasks.devices import DeviceSpec

    return DeviceSpec(name=name, cpu_arch="x86_64", cores=2, ram_mb=4096, storage_mb=1024, power_budget_w=10.0,
                      thermal_limit_c=80.0, preferred_runtime="tflite", latency_budget_ms=50.0,
                      runner={"kind": "local", **runner})


def _params(**benchmark):
    from tasks.config import BenchmarkParams

    return BenchmarkParams(**{"iterations": 20, "warmup": 2, **benchmark})


def _staged(tmp_path, device, files: dict[str, Path], x: np.ndarray, y: np.ndarray, params=None) -> Path:
    from tasks.benchmark.staging import Candidate, stage_inputs

    return stage_inputs([Candidate(name, path) for name, path in files.items()], x, y, device, params or _params(),
                        tmp_path / "inputs", 120.0)


@pytest.fixture(scope="module")
def activation_heavy_model(tmp_path_factory) -> Path:
    """A float model whose one activation is 64 MiB (512x512x64 float32): it cannot run in 96 MiB."""
    import tf_keras as keras

    from tasks.model import exporters

    inputs = keras.Input((512, 512, 3))
    x = keras.layers.Conv2D(64, 3, padding="same")(inputs)
    outputs = keras.layers.Dense(10, activation="softmax")(keras.layers.GlobalAveragePooling2D()(x))
    path = tmp_path_factory.mktemp("heavy") / "heavy.tflite"
    path.write_bytes(exporters.tflite_bytes(keras.Model(inputs, outputs), "fp32"))
    return path


def _require_root_for_cgroups():
    """Skip as non-root. Not skip_unless_ci: not being root is how the suite was started, not a package the host
    lacks, and CI runs as root, so these tests run there. What needs no root (the taskset+prlimit fallback a
    non-root user gets) is tested in tests/unit/test_confine.py."""
    import os

    if os.geteuid() != 0:
        pytest.skip("confining to cgroups needs root: run as root to test it (sudo -E .venv/bin/python -m pytest "
                    "tests/integration/test_device_benchmark.py); as non-root the benchmark falls back to "
                    "taskset+prlimit, tested in tests/unit/test_confine.py")


def test_the_local_runner_confines_the_benchmark_to_the_devices_cpus_and_memory(bundle_kit, digits, tmp_path):
    from tasks.benchmark.runners import LocalRunner

    _require_root_for_cgroups()
    device = _device("small-board", cpus=1.0, memory_mb=300)
    inputs = _staged(tmp_path, device, {"tflite_int8": bundle_kit.model_files["tflite_int8"]}, digits.x[:50],
                     digits.y[:50])
    document = LocalRunner().run(device, inputs, 120.0)
    environment = document["environment"]  # read by edge.bench from inside the confined process
    assert environment["memory_limit_bytes"] == 300 * 1024 * 1024
    assert environment["cpu_quota_cores"] == pytest.approx(1.0)
    assert document["runner"]["confinement"]["method"] in ("cgroup-v1", "cgroup-v2")
    (row,) = document["results"]
    assert row["status"] == "ok" and row["accuracy"] > 0.8 and row["config"]["threads"] == 2


def test_a_model_too_big_for_the_memory_limit_is_an_error_row_not_a_hang(activation_heavy_model, tmp_path,
                                                                         bundle_kit, digits):
    from tasks.benchmark.runners import LocalRunner

    _require_root_for_cgroups()
    device = _device("tiny-board", cpus=1.0, memory_mb=96)
    x = np.random.default_rng(0).random((1, 512, 512, 3), dtype=np.float32)
    inputs = _staged(tmp_path, device, {"heavy": activation_heavy_model}, x, np.zeros(1, np.int64))
    document = LocalRunner().run(device, inputs, 120.0)
    (row,) = document["results"]
    assert row["status"] == "error" and "SIGKILL" in row["error"] and "memory" in row["error"]


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    from tasks.stack import services
    from tests.conftest import require_system_tools
    from tests.sshd_helpers import start_sshd

    require_system_tools("sshd", "ssh-keygen", packages="openssh-server")
    run_dir = tmp_path_factory.mktemp("sshd")
    target = start_sshd(run_dir, services.free_port())
    try:
        yield target
    finally:
        services.stop("sshd", run_dir)


def test_the_ssh_runner_copies_runs_fetches_and_cleans_up(sshd, bundle_kit, digits, tmp_path):
    import sys

    from tasks.benchmark.runners import SshRunner

    device = _device("ssh-board", kind="ssh", host=sshd.host, port=sshd.port, user=sshd.user, python=sys.executable)
    files = {name: bundle_kit.model_files[name] for name in ("tflite_int8", "onnx_int8")}
    inputs = _staged(tmp_path, device, files, digits.x[:40], digits.y[:40])
    before = set(Path("/tmp").glob("edgeloop-bench.*"))
    document = SshRunner(_params(ssh_key=sshd.client_key, known_hosts=sshd.known_hosts)).run(device, inputs, 120.0)
    assert [row["status"] for row in document["results"]] == ["ok", "ok"]
    assert document["runner"]["target"] == f"{sshd.user}@127.0.0.1:{sshd.port}"
    assert document["environment"]["device"] == "ssh-board"
    assert set(Path("/tmp").glob("edgeloop-bench.*")) == before  # the remote temp dir is gone


def test_the_ssh_runner_refuses_a_host_whose_key_is_not_known(sshd, bundle_kit, digits, tmp_path):
    from tasks.benchmark.runners import RunnerError, SshRunner

    other = tmp_path / "known_hosts"
    other.write_text(f"[127.0.0.1]:{sshd.port} ssh-ed25519 "
                     "AAAAC3NzaC1lZDI1NTE5AAAAIHtC2lJ0ydUkx1wH6j2mD+3Gf6v4q5w7r7Yl7Kk3N1bZ\n")
    device = _device("ssh-board", kind="ssh", host=sshd.host, port=sshd.port, user=sshd.user)
    inputs = _staged(tmp_path, device, {"tflite_int8": bundle_kit.model_files["tflite_int8"]}, digits.x[:5],
                     digits.y[:5])
    with pytest.raises(RunnerError) as refused:
        SshRunner(_params(ssh_key=sshd.client_key, known_hosts=other)).run(device, inputs, 60.0)
    assert "HostKeyNotVerifiable" in str(refused.value) and not refused.value.transient


@pytest.fixture
def workspace_copy(nightly_run, tmp_path):
    """The nightly run's workspace (evaluated variants, test split), copied so this test owns its outputs."""
    from tasks.workspace import Workspace

    source = Path(nightly_run.parameters["workspace"])
    for folder in ("data", "models", "reports"):
        shutil.copytree(source / folder, tmp_path / "ws" / folder)
    return Workspace(tmp_path / "ws")


def test_the_stage_goes_on_past_an_unreachable_device_and_gates_the_others(stack, workspace_copy, sshd, tmp_path):
    import yaml

    from tasks.benchmark.stage import benchmark
    from tasks.config import load_params
    from tests.conftest import REPO_ROOT

    devices = tmp_path / "devices.yaml"
    board = _device("board", cpus=1.0, memory_mb=512).model_dump(mode="json")
    slow = _device("slow-board", cpus=1.0).model_dump(mode="json") | {"latency_budget_ms": 0.001}
    gone = _device("gone", kind="ssh", host="127.0.0.1", port=sshd.port + 1 if sshd.port < 65535 else 1,
                   user="nobody").model_dump(mode="json")
    devices.write_text(yaml.safe_dump({"devices": [board, slow, gone]}))
    params = load_params(REPO_ROOT / "params.yaml")
    params = params.model_copy(update={"benchmark": _params(known_hosts=sshd.known_hosts, ssh_key=sshd.client_key,
                                                            retries=1, retry_delay_s=0.1, eval_samples=60)})
    summary = benchmark(params, workspace_copy, devices)
    outcomes = {outcome.device: outcome for outcome in summary.devices}
    assert outcomes["gone"].status == "error" and "cannot connect" in outcomes["gone"].error
    assert "after 2 attempt(s)" in outcomes["gone"].error  # retried once, as configured
    assert all(row.status == "error" for row in summary.rows if row.device == "gone")
    board_rows = [row for row in summary.rows if row.device == "board"]
    assert board_rows and all(row.status == "ok" and row.accuracy is not None for row in board_rows)
    assert outcomes["board"].recommended in {row.variant for row in board_rows if row.gates_passed}
    # the same figures, but a budget nothing meets: every row fails its latency gate, nothing is recommended
    assert outcomes["slow-board"].recommended is None
    assert all(any("device p95 latency" in f for f in row.gate_failures) for row in summary.rows
               if row.device == "slow-board")
    for suffix in ("md", "csv", "png"):
        assert workspace_copy.benchmark_report(suffix).stat().st_size > 0
    assert workspace_copy.benchmark_device_file("board").is_file()
    assert not workspace_copy.benchmark_device_file("gone").exists()


def test_the_prefect_runner_runs_on_the_devices_own_worker(stack, bundle_kit, digits, tmp_path):
    from tasks.benchmark.prefect_runner import PrefectRunner, ensure_deployment, pool_name
    from tasks.benchmark.runners import RunnerError
    from tasks.stack import services

    device = _device("fleet-board", kind="prefect")
    inputs = _staged(tmp_path, device, {"tflite_int8": bundle_kit.model_files["tflite_int8"]}, digits.x[:30],
                     digits.y[:30])
    runner = PrefectRunner(_params())
    # no worker polls edge-idle-board: the run is cancelled at the timeout and the error says what to start
    idle = _device("idle-board", kind="prefect")
    with pytest.raises(RunnerError, match="no worker picked it up.*prefect worker start --pool edge-idle-board"):
        runner.run(idle, inputs, 8.0)
    prefect_port = int(stack.api_url.rsplit(":", 1)[1].split("/")[0])
    run_dir = tmp_path / "device-worker"
    ensure_deployment(device)  # creates the pool; then the device's worker polls it
    services.start_worker(run_dir, prefect_port, stack.mlflow_url, pool=pool_name(device.name))
    try:
        document = runner.run(device, inputs, 240.0)
    finally:
        services.stop("prefect-worker", run_dir)
    (row,) = document["results"]
    assert row["status"] == "ok" and row["accuracy"] is not None
    assert document["runner"]["pool"] == "edge-fleet-board" and document["environment"]["device"] == "fleet-board"


def test_the_nightly_run_benchmarks_candidates_on_the_device_and_records_it(stack, nightly_run):
    """benchmark_devices: [x86-gateway] (local runner): figures measured by edge.bench reach MLflow and the UI."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from tasks.contracts import read_benchmark, read_registration
    from tasks.workspace import Workspace
    from tests.stack_helpers import mlflow_client, mlflow_runs_of

    workspace = Workspace(Path(nightly_run.parameters["workspace"]))
    summary = read_benchmark(workspace)
    assert [outcome.device for outcome in summary.devices] == ["x86-gateway"]
    assert {row.variant for row in summary.rows} == {"tflite_fp32", "tflite_int8"}
    assert all(row.status == "ok" and row.p95_ms > 0 and row.accuracy > 0.5 for row in summary.rows)
    (run,) = mlflow_runs_of(stack, nightly_run.id)
    assert {row.config for row in summary.rows} == {"default", "no-xnnpack"}  # devices.yaml: compare_xnnpack
    for row in summary.rows:
        figure = f"device.x86-gateway.{row.variant}{'' if row.config == 'default' else '.' + row.config}"
        assert run.data.metrics[f"{figure}.p95_ms"] == pytest.approx(row.p95_ms)
        assert run.data.metrics[f"{figure}.accuracy"] == pytest.approx(row.accuracy)
    recommended = summary.devices[0].recommended
    assert recommended is not None and run.data.tags["device.x86-gateway.recommended"] == recommended
    registered = mlflow_client(stack).get_model_version("edgeloop-digits", read_registration(workspace).version)
    assert registered.tags["device.x86-gateway.variant"] == recommended
    assert registered.tags["device.x86-gateway.rule"] == "benchmark"  # measured beats estimated
    others = {key.split(".")[1]: value for key, value in registered.tags.items()
              if key.startswith("device.") and key.endswith(".rule") and key != "device.x86-gateway.rule"}
    assert others and set(others.values()) <= {"preferred_runtime", "overall", "none"}, others  # not measured here
    choices = mlflow_client(stack).download_artifacts(run.info.run_id, "release/device_choices.json")
    assert {choice["device"] for choice in json.loads(Path(choices).read_text())["device_choices"]} == {
        "x86-gateway", *others}
    artifacts = {path.path for path in mlflow_client(stack).list_artifacts(run.info.run_id, "reports/benchmark")}
    assert {"reports/benchmark/summary.json", "reports/benchmark/devices.png",
            "reports/benchmark/x86-gateway.json"} <= artifacts
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(
            any_=[nightly_run.id])))}
    assert {"device-benchmark", "device-benchmark-rows"} <= keys
