"""Shared fixtures: tiny real data and tiny real models, built once per test session."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The workers tests start (they inherit this environment) poll every 2 s, not Prefect's 10: a deployment run is
# picked up 4 s sooner on average, over the suite's many runs.
os.environ.setdefault("PREFECT_WORKER_QUERY_SECONDS", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
# fixtures kept in their own module, found by pytest through these names
from tests.session_fixtures import bundle_kit, shared_postgres  # noqa: E402, F401


@pytest.fixture(scope="session")
def digits():
    """The bundled digits data (real, tiny) as a tasks.contracts.Dataset."""
    from tasks.data.sources import load_sklearn_digits

    return load_sklearn_digits()


@pytest.fixture(scope="session")
def tiny_model(digits):
    """A small float32 Keras model trained for two epochs on 600 digits (seeded)."""
    import tf_keras as keras

    from tasks.model.tfsetup import set_seeds

    set_seeds(0)
    inputs = keras.Input(digits.input_shape)
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    model.fit(digits.x[:600], digits.y[:600], epochs=2, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def tiny_model_files(tiny_model, digits, tmp_path_factory) -> dict[str, Path]:
    """The tiny model exported as tflite fp32/int8 and onnx fp32/int8 files."""
    from tasks.model import exporters

    out = tmp_path_factory.mktemp("tiny_models")
    representative = digits.x[:50]
    onnx_fp32 = exporters.onnx_bytes(tiny_model, 17)
    contents = {
        "tflite_fp32.tflite": exporters.tflite_bytes(tiny_model, "fp32"),
        "tflite_int8.tflite": exporters.tflite_bytes(tiny_model, "int8", representative),
        "onnx_fp32.onnx": onnx_fp32,
        "onnx_int8.onnx": exporters.onnx_int8_bytes(onnx_fp32, representative),
    }
    paths = {}
    for name, content in contents.items():
        (out / name).write_bytes(content)
        paths[name.split(".")[0]] = out / name
    return paths


@pytest.fixture
def rng():
    return np.random.default_rng(0)


# ---- real services (Prefect server, MLflow server, process worker) --------------------------------

# Latency budgets no healthy run can miss, however loaded the host: tests assert behaviour; the latency gates'
# own pass/fail is unit-tested (tests/unit/test_evaluate.py) and real figures come from bench/.
GENEROUS_LATENCY_MS = 1000.0
FAST_FLOW_PARAMETERS = {
    "epochs": 2, "strategy": "ptq", "prune": False, "variants": ["tflite_fp32", "tflite_int8"],
    "gates": {"min_accuracy": 0.8, "max_accuracy_drop_pts": 5.0, "min_weight_reduction": 3.0,
              "max_host_latency_ms": GENEROUS_LATENCY_MS},
    "platforms": ["linux/amd64"],  # arm64 images are built under qemu in tests/integration/test_package.py only
    "benchmark_devices": ["x86-gateway"],  # the local runner; the others: tests/integration/test_device_benchmark.py
}


@dataclass(frozen=True)
class Stack:
    prefect_url: str
    api_url: str
    mlflow_url: str
    run_dir: Path
    env: dict[str, str]


def fast_parameters(**changes) -> dict:
    """Full TrainingParameters JSON (as the UI would send) with fast training settings."""
    from flows.parameters import default_parameters

    return {**default_parameters().model_dump(mode="json"), **FAST_FLOW_PARAMETERS, **changes}


def compose(args: list[str], env: dict[str, str], project: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
    """``docker-compose --project-name PROJECT ARGS`` from the repository root with ``env`` added."""
    require_system_tools("docker-compose", packages="docker-compose")
    return subprocess.run([shutil.which("docker-compose"), "--project-name", project, *args], cwd=REPO_ROOT,
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=timeout_s)


def restore_environment(saved: dict[str, str | None]) -> None:
    """Put ``os.environ`` back as ``saved`` recorded it (None: the variable was not set)."""
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def skip_unless_ci(reason: str) -> None:
    """Skip with ``reason`` (shown in the summary); on CI (CI=true) a missing prerequisite is a failure."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(reason)
    pytest.skip(reason)


def require_system_tools(*tools: str, packages: str) -> None:
    """Skip unless every tool is on PATH (sbin included); on CI (CI=true) a missing tool is a failure."""
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    missing = [tool for tool in tools if shutil.which(tool, path=search) is None]
    if missing:
        skip_unless_ci(f"{', '.join(missing)} not installed (apt-get install {packages})")


@dataclass(frozen=True)
class ImageEnv:
    """Where packaging tests push (a registry of this session) and the keys they sign with."""

    registry: str
    signing_key: Path
    public_keys: Path

    @property
    def env(self) -> dict[str, str]:
        """For the flows' packaging too; the cold-start gate's budget is one no healthy start misses on a loaded
        2-core host (the gate itself: test_package.py's failed-gate test)."""
        return {"EDGELOOP_REGISTRY": self.registry, "EDGELOOP_SIGNING_KEY": str(self.signing_key),
                "EDGELOOP_TRUSTED_KEYS": str(self.public_keys), "EDGELOOP_MAX_START_S": "60"}


@pytest.fixture(scope="session")
def image_env(tmp_path_factory) -> ImageEnv:
    """A registry port and signing keys for this session (nothing started: see ``images``)."""
    from tasks.registry.bundle import generate_keypair
    from tasks.stack.services import free_port

    keys = tmp_path_factory.mktemp("package-keys")
    private, public = generate_keypair(keys / "private", "ci-control-plane")
    (keys / "public").mkdir()
    shutil.copy(public, keys / "public" / public.name)
    return ImageEnv(f"127.0.0.1:{free_port()}", private, keys / "public")


WARMUP_RUN_DIR = ".run/test-warmup"  # where `make test` starts the base image warm-up (Makefile)
SHARED_ENGINE = "shared-docker-engine"  # under pytest-xdist: the engine the workers share, stopped by the controller


def _xdist_worker() -> bool:
    return bool(os.environ.get("PYTEST_XDIST_WORKER"))


@pytest.fixture(scope="session")
def images(image_env, tmp_path_factory) -> Iterator[ImageEnv]:
    """A Docker engine (ours unless one answers) and a registry of this session, via tasks/stack/services.py.

    Under pytest-xdist the workers share one engine (started once, under the cache's lock): the one that
    started it must not stop it under the other, so it is stopped by the controller when the run ends."""
    from tasks.stack import services
    require_system_tools("dockerd", "docker", "docker-registry", "debootstrap", "qemu-aarch64-static",
                         packages="docker.io docker-registry debootstrap qemu-user-static binfmt-support")
    run_dir = tmp_path_factory.mktemp("image-services")
    engine_dir = tmp_path_factory.getbasetemp().parent / SHARED_ENGINE if _xdist_worker() else run_dir
    saved = {key: os.environ.get(key) for key in ("DOCKER_HOST", *image_env.env)}
    try:
        os.environ["DOCKER_HOST"] = services.start_docker_engine(engine_dir)
        services.start_registry(run_dir, int(image_env.registry.rsplit(":", 1)[1]))
        os.environ.update(image_env.env)
        yield image_env
    finally:
        services.stop("registry", run_dir)
        if not _xdist_worker():
            services.stop("dockerd", run_dir)  # only an engine this fixture started
        restore_environment(saved)


# Files whose tests wait for images `make test` builds beside the first tests (the Python bases, the arm64 one
# under qemu, the compose stack's): collected after the other e2e and integration tests, so pytest-xdist hands
# them out late and no worker sits waiting for them. The unit tests come last of all: short files that fill
# the cores while the other worker finishes the last long integration test.
COLLECTED_LATE = ("test_agent_engine.py", "test_package.py", "test_stack_compose.py")


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: ("unit" in item.path.parts, item.path.name in COLLECTED_LATE))  # stable sort


STARTING_ENVIRONMENT = dict(os.environ)  # as the session began, before any fixture pointed it at its servers


@pytest.fixture(autouse=True)
def _unit_tests_see_the_starting_environment(request) -> Iterator[None]:
    """A unit test runs with ``os.environ`` as the session began: an integration test's session fixtures (the
    stack's EDGELOOP_*, PREFECT_API_URL, MLFLOW_TRACKING_URI, DOCKER_HOST) stay set for the rest of their worker's
    session, and a unit test after them in the same worker must not talk to those servers or read those keys."""
    current = dict(os.environ)
    if "unit" not in request.node.path.parts or current == STARTING_ENVIRONMENT:
        yield
        return
    os.environ.clear()
    os.environ.update(STARTING_ENVIRONMENT)
    uri = _mlflow_tracking_state()[0]
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(current)
        if "mlflow" in sys.modules:
            sys.modules["mlflow"].tracking._tracking_service.utils._tracking_uri = uri


def _mlflow_tracking_state() -> tuple[str | None, str | None]:
    """MLflow's process-wide tracking URI as set (None: unset, the environment decides) and the environment's.

    Read raw: ``mlflow.set_tracking_uri`` also sets (or, given None, removes) ``MLFLOW_TRACKING_URI``, so the
    two are saved and put back as they were, not through it."""
    uri = sys.modules["mlflow"].tracking._tracking_service.utils._tracking_uri if "mlflow" in sys.modules else None
    return uri, os.environ.get("MLFLOW_TRACKING_URI")


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_kept(request) -> Iterator[None]:
    """MLflow's tracking URI, process-wide and in the environment, is put back after every integration and e2e test
    as it was before it: a test (or a flow it ran in-process) that pointed it elsewhere, at a server or store that
    is gone by then, must not decide which one the next test talks to, whatever order pytest-xdist runs them in."""
    watched = bool({"integration", "e2e"} & set(request.node.path.parts))
    uri, environment = _mlflow_tracking_state()
    yield
    if watched and "mlflow" in sys.modules:
        sys.modules["mlflow"].tracking._tracking_service.utils._tracking_uri = uri
        if environment is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = environment


def pytest_sessionfinish(session) -> None:
    """The xdist controller stops the engine its workers shared (if one of them started it)."""
    if _xdist_worker() or not getattr(session.config.option, "numprocesses", None):
        return
    from tasks.stack import services

    services.stop("dockerd", session.config._tmp_path_factory.getbasetemp() / SHARED_ENGINE)


def _host_state(config, with_engine: bool) -> str:
    """What a failing integration test's report adds: the host's load, memory and disk, and (for a test of the
    Docker engine) whether each dockerd the suite may have started still runs, with its log's last lines, so a
    CI failure caused by the host or a dead engine says so instead of leaving only the test's symptom."""
    from tasks.packaging.docker_client import CACHE_DIR
    from tasks.stack.processes import log_tail, running_pid

    memory = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines() if ":" in line)
    free = shutil.disk_usage(CACHE_DIR if CACHE_DIR.exists() else Path.home())
    lines = [f"load {os.getloadavg()}, MemAvailable {memory.get('MemAvailable', '?').strip()}, "
             f"{free.free / 2**30:.1f} GiB free under {CACHE_DIR}"]
    if with_engine:
        basetemp = config._tmp_path_factory.getbasetemp()
        candidates = [basetemp.parent / SHARED_ENGINE, *basetemp.glob("image-services*"), REPO_ROOT / WARMUP_RUN_DIR]
        for run_dir in dict.fromkeys(path.resolve() for path in candidates):
            if (run_dir / "dockerd.log").is_file():
                state = "running" if running_pid(run_dir, "dockerd") else "NOT RUNNING"
                lines += [f"dockerd of {run_dir}: {state}; its log ends:", log_tail(run_dir / "dockerd.log", 25)]
    return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and {"integration", "e2e"} & set(item.path.parts):
        try:
            report.sections.append(("host state", _host_state(item.config, "images" in item.fixturenames)))
        except Exception as error:  # noqa: BLE001 - a diagnostic must never hide the test's own failure
            report.sections.append(("host state", f"not read: {error!r}"))


@pytest.fixture(scope="session")
def stack(tmp_path_factory, image_env) -> Iterator[Stack]:
    """Prefect + MLflow servers and a worker, started by tasks/stack/services.py; deployments applied.

    The worker gets the packaging settings of ``image_env`` (registry, keys); the tests that package
    also ask for ``images``, which starts the engine and the registry.
    """
    from tasks.stack import services
    run_dir = tmp_path_factory.mktemp("services")
    prefect_port, mlflow_port = services.free_port(), services.free_port()
    api_url = f"http://127.0.0.1:{prefect_port}/api"
    env = {**services.prefect_env(run_dir / "prefect", prefect_port),
           "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}", **image_env.env}
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        started = services.up(run_dir, prefect_port, mlflow_port, schedules=False)  # only the runs tests ask for
        from prefect.settings import PREFECT_API_URL, temporary_settings

        deploy = subprocess.run([str(Path(sys.executable).parent / "prefect"), "--no-prompt", "deploy", "--all"],
                                cwd=REPO_ROOT, env={**os.environ, "PWD": str(REPO_ROOT)}, capture_output=True,
                                text=True, timeout=300)
        assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            yield Stack(started[0].url, api_url, started[1].url, run_dir, env)
    finally:
        services.down(run_dir)
        restore_environment(saved)


@pytest.fixture(scope="session")
def nightly_run(stack, tmp_path_factory):
    """One `training/nightly` deployment run through the worker, with epochs changed to 3.

    The quantization strategy is params.yaml's default, ``auto`` (PTQ, QAT only when PTQ costs too much):
    the path a user gets; the other pipeline tests pin ``ptq`` or ``qat``.
    """
    from prefect.deployments import run_deployment

    workspace = tmp_path_factory.mktemp("nightly")
    flow_run = run_deployment("training/nightly", timeout=600, poll_interval=1,
                              parameters={"params": fast_parameters(epochs=3, strategy="auto"),
                                          "workspace": str(workspace)})
    assert flow_run.state.is_completed(), flow_run.state.message
    return flow_run
