"""Container packaging against a real Docker engine, a real registry and a real MLflow server (no mocks).

The registered version is the nightly run's candidate (tests/conftest.py ``nightly_run``). The engine is
Debian's dockerd started by tasks/stack/services.py (unless one answers); base images come from
debootstrap and are cached in ``~/.cache/edgeloop`` with the wheelhouses, so only a machine's first
run pays for them. arm64 runs under qemu user emulation: only its labels are compared.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO_ROOT, compose
from tests.stack_helpers import mlflow_client

pytestmark = pytest.mark.integration
MODEL_NAME = "edgeloop-digits"


def _params(stack, **package):
    from tasks.config import load_params

    params = load_params(REPO_ROOT / "params.yaml")
    # a cold-start budget no healthy start misses on a loaded host (the gate failing: test_a_failed_gate_...)
    settings = {"platforms": ["linux/amd64"], "max_start_s": 60.0, **package}
    return params.model_copy(update={"package": params.package.model_copy(update=settings)})


def _candidate(stack) -> str:
    return str(mlflow_client(stack).get_model_version_by_alias(MODEL_NAME, "candidate").version)


def _registry_tags(images, repository: str = "edgeloop/edge") -> list[str]:
    from tasks.packaging.oci_registry import Registry

    return Registry(images.registry).tags(repository)


@pytest.fixture(scope="module")
def shipped(stack, nightly_run, images, tmp_path_factory):
    """The candidate packaged for amd64: (report, workspace)."""
    from tasks.packaging.package import package
    from tasks.workspace import Workspace

    workspace = Workspace(tmp_path_factory.mktemp("package"))
    return package(_params(stack), workspace, version=_candidate(stack)), workspace


def test_the_image_is_built_checked_pushed_and_recorded(stack, images, shipped):
    report, workspace = shipped
    (image,) = report.images
    assert image.status == "pushed" and image.digest.startswith("sha256:")
    assert image.reference.startswith(f"{images.registry}/edgeloop/edge:model-v{report.version}-")
    assert image.reference.endswith(f"-{report.variant.partition('_')[2].replace('_', '-')}-tflite-amd64")
    assert 0 < image.image_mb <= 250 and 0 < image.ready_s <= 60.0  # the size gate default; the test start budget
    assert image.label_agreement == 1.0 and image.max_abs_score_diff <= 1e-5
    assert image.user == "10001" and not image.emulated
    assert workspace.package_file.is_file()
    version = mlflow_client(stack).get_model_version(MODEL_NAME, report.mlflow_version)
    assert version.tags["image.amd64"] == image.pinned
    assert version.tags["image.version"] == report.version
    package_run = mlflow_client(stack).get_run(version.tags["image.package_run_id"])
    assert package_run.info.status == "FINISHED"
    assert package_run.data.metrics["image.amd64.mb"] == image.image_mb


def test_docker_inspect_alone_says_what_runs_and_where_it_came_from(stack, images, shipped):
    import docker

    report, _ = shipped
    (image,) = report.images
    client = docker.from_env()
    pulled = client.images.pull(image.pinned)  # by digest, from the registry
    labels = pulled.labels
    version = mlflow_client(stack).get_model_version(MODEL_NAME, report.mlflow_version)
    run = mlflow_client(stack).get_run(version.run_id)
    assert labels["org.opencontainers.image.version"] == report.version
    assert labels["org.opencontainers.image.revision"] == run.data.tags["git_commit"]
    assert labels["org.opencontainers.image.created"].startswith("20")
    assert labels["edgeloop.model-name"] == MODEL_NAME
    assert labels["edgeloop.mlflow-version"] == report.mlflow_version
    assert labels["edgeloop.mlflow-run-id"] == version.run_id
    assert labels["edgeloop.variant"] == report.variant
    assert labels["edgeloop.data-version"] == run.data.tags["data_version"]
    assert labels["edgeloop.params-hash"] == run.data.tags["params_hash"]
    assert len(labels["edgeloop.manifest-sha256"]) == 64
    config = pulled.attrs["Config"]
    assert config["User"] == "edgeloop" and "/readyz" in " ".join(config["Healthcheck"]["Test"])
    assert pulled.attrs["Architecture"] == "amd64"


def test_the_pulled_image_serves_on_a_device_profile(stack, images, shipped, bundle_kit):
    import docker
    from tasks.devices import load_devices
    from tasks.packaging.docker_client import running

    report, _ = shipped
    (image,) = report.images
    device = load_devices(REPO_ROOT / "devices.yaml").get("industrial-256mb")
    client = docker.from_env()
    with running(client, image.pinned, "linux/amd64", device.runner.cpus, device.runner.memory_mb, 30) as container:
        limits = client.containers.get(container.container.id).attrs["HostConfig"]
        assert limits["NanoCpus"] == int(device.runner.cpus * 1e9) and limits["Memory"] == 256 * 2**20
        answer = httpx.post(f"{container.url}/v1/predict", json={"inputs": bundle_kit.sample[:4].tolist()}).json()
        assert answer["version"] == f"v{report.mlflow_version}" and len(answer["predictions"]) == 4
        assert all(row["label"] in [str(i) for i in range(10)] for row in answer["predictions"])
        assert httpx.get(f"{container.url}/readyz").json()["status"] == "ready"
        metrics = httpx.get(f"{container.url}/metrics").text
        assert "edgeloop_predictions_total" in metrics and "edgeloop_inference_latency_seconds" in metrics
        # the image has no shell: what follows runs in the container's own Python, as the service user
        python = "/opt/edgeloop/bin/python"
        assert container.exec(python, "-c", "import os; print(os.getuid())") == "10001"
        # model files are read-only for the service user: the store is changed only through install
        store = "/var/lib/edgeloop/models/versions"
        append = ("import sys\ntry:\n    open(sys.argv[1], 'a').write('x')\n"
                  "except PermissionError:\n    print('Permission denied')")
        assert container.exec(python, "-c", append, f"{store}/v{report.mlflow_version}/manifest.json") == \
            "Permission denied"
        # the trusted keys decide what installs: root's and read-only, so the service user cannot add its own
        keys = "/etc/edgeloop/keys"
        owners = container.exec(python, "-c", "import os, sys; root = sys.argv[1]; [print(os.stat(p).st_uid, "
                                "oct(os.stat(p).st_mode & 0o777)[2:], p) for p in [root] + [os.path.join(root, n) "
                                "for n in sorted(os.listdir(root))]]", keys).splitlines()
        assert len(owners) >= 2 and all(line.startswith(("0 555 ", "0 444 ")) for line in owners), owners
        first_key = owners[1].split()[-1]
        for target in (f"{keys}/planted.pub", first_key):
            assert container.exec(python, "-c", append, target) == "Permission denied"
        assert container.exec(python, "-c", "import shutil; print(shutil.which('sh') or 'no shell')") == "no shell"


def test_packaging_again_reuses_the_release_without_rebuilding(stack, images, shipped, tmp_path):
    from tasks.packaging.package import package
    from tasks.workspace import Workspace

    report, _ = shipped
    again = package(_params(stack), Workspace(tmp_path), version=report.mlflow_version)
    assert again.version == report.version and "already released" in again.version_reason
    assert again.images[0].status == "already_released" and again.images[0].digest == report.images[0].digest


def test_a_failed_gate_pushes_nothing_and_records_the_figures(stack, images, shipped, tmp_path):
    from tasks.errors import PackagingError
    from tasks.packaging.package import package
    from tasks.workspace import Workspace

    report, _ = shipped
    params = _params(stack, repository="edgeloop/gate-check", max_image_mb=20.0, max_start_s=0.001, start_attempts=2)
    with pytest.raises(PackagingError) as failure:
        package(params, Workspace(tmp_path), version=report.mlflow_version)
    assert "nothing was pushed" in str(failure.value)
    assert "above package.max_image_mb 20" in str(failure.value) and "above package.max_start_s" in str(failure.value)
    assert "fastest of 2 starts" in str(failure.value)  # an over-budget start is measured again before failing
    assert _registry_tags(images, "edgeloop/gate-check") == []
    client = mlflow_client(stack)
    assert client.get_model_version(MODEL_NAME, report.mlflow_version).tags["image.amd64"] == report.images[0].pinned
    failed = [run for run in client.search_runs([client.get_run(
        client.get_model_version(MODEL_NAME, report.mlflow_version).run_id).info.experiment_id],
        "tags.`edgeloop.stage` = 'package'") if run.info.status == "FAILED"]
    assert failed and failed[0].data.metrics["image.amd64.mb"] > 20


@pytest.mark.parametrize("case", ["registry", "engine", "signing_key", "trusted_keys", "version"])
def test_bad_input_names_the_problem_and_ships_nothing(stack, images, shipped, tmp_path, case, bundle_kit):
    from tasks.stack.services import free_port

    report, _ = shipped
    env = {**os.environ, "MLFLOW_TRACKING_URI": stack.mlflow_url}
    version = report.mlflow_version
    if case == "registry":
        env["EDGELOOP_REGISTRY"], expected = f"127.0.0.1:{free_port()}", "is unreachable"
    elif case == "engine":
        env["DOCKER_HOST"], expected = f"unix://{tmp_path}/no-engine.sock", "no Docker engine answers"
    elif case == "signing_key":
        env["EDGELOOP_SIGNING_KEY"], expected = str(tmp_path / "missing.key"), "edgeloop keys generate"
    elif case == "trusted_keys":  # the image would not trust the key that signed the bundle
        env["EDGELOOP_TRUSTED_KEYS"], expected = str(bundle_kit.public_dir), "unknown_key"
    else:
        version, expected = "999", "has no version 999"
    tags_before = _registry_tags(images)
    completed = subprocess.run([str(Path(sys.executable).parent / "edgeloop"), "package", "--version", version,
                                "--platform", "linux/amd64", "--workspace", str(tmp_path)], cwd=REPO_ROOT, env=env,
                               capture_output=True, text=True, timeout=600)
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert expected in completed.stderr and "Traceback" not in completed.stderr
    assert _registry_tags(images) == tags_before
    assert not (tmp_path / "reports" / "package.json").exists()


def test_a_build_error_is_reported_with_the_build_log(stack, images, shipped, tmp_path, monkeypatch):
    from tasks.errors import PackagingError
    from tasks.packaging import image_build
    from tasks.packaging import package as package_module
    from tasks.workspace import Workspace

    report, _ = shipped
    broken = tmp_path / "Dockerfile"
    broken.write_text((REPO_ROOT / "docker" / "Dockerfile").read_text().replace(
        "${BASE_IMAGE} AS builder\n", "${BASE_IMAGE} AS builder\nRUN echo the-step-that-breaks && false\n", 1))
    assert "the-step-that-breaks" in broken.read_text()
    monkeypatch.setattr(image_build, "DOCKERFILE", broken)  # a real build of a Dockerfile with a failing step
    with pytest.raises(PackagingError) as failure:
        package_module.package(_params(stack, repository="edgeloop/broken"), Workspace(tmp_path),
                               version=report.mlflow_version)
    assert "failed" in str(failure.value) and "the-step-that-breaks" in str(failure.value)
    assert _registry_tags(images, "edgeloop/broken") == []


def test_a_foreign_image_under_the_release_tag_is_never_overwritten(stack, images, shipped, tmp_path):
    """The registry holds something else under the tag this release would get: the error says how to recover."""
    import io
    import tarfile

    import docker
    from tasks.errors import PackagingError
    from tasks.packaging.image_version import SemVer, image_tag
    from tasks.packaging.oci_registry import Registry
    from tasks.packaging.package import package
    from tasks.workspace import Workspace

    report, _ = shipped
    repository, tag = "edgeloop/foreign", image_tag(SemVer(1, 0, 0), report.variant, "amd64")
    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w") as tar:  # a one-file image with no edgeloop labels
        content = b"not a model\n"
        info = tarfile.TarInfo("README")
        info.size = len(content)
        tar.addfile(info, io.BytesIO(content))
    client = docker.from_env()
    client.api.import_image_from_data(layer.getvalue(), repository=f"{images.registry}/{repository}", tag=tag)
    client.images.push(f"{images.registry}/{repository}", tag=tag)
    held = Registry(images.registry).digest(repository, tag)
    assert held is not None
    with pytest.raises(PackagingError) as failure:
        package(_params(stack, repository=repository), Workspace(tmp_path), version=report.mlflow_version)
    message = str(failure.value)
    assert "is not an edgeloop model image" in message and "tags are never overwritten" in message
    assert "package.repository" in message and "remove .run/registry" in message
    assert Registry(images.registry).digest(repository, tag) == held and _registry_tags(images, repository) == [tag]
    assert not (tmp_path / "reports" / "package.json").exists()


@pytest.fixture(scope="module")
def shipped_arm(stack, images, shipped, tmp_path_factory):
    """The same candidate packaged for arm64 and armv7 in one run (built on this host, checked under qemu)."""
    from tasks.packaging.package import package
    from tasks.workspace import Workspace

    report, _ = shipped
    return package(_params(stack, platforms=["linux/arm64", "linux/arm/v7"]),
                   Workspace(tmp_path_factory.mktemp("arm")), version=report.mlflow_version)


@pytest.fixture(scope="module")
def shipped_arm64(shipped_arm):
    (image,) = [image for image in shipped_arm.images if image.arch == "arm64"]
    return image


def test_the_arm64_image_answers_under_emulation(stack, images, shipped, shipped_arm, shipped_arm64, bundle_kit):
    import docker
    from tasks.packaging.docker_client import running

    report, _ = shipped
    image = shipped_arm64
    assert shipped_arm.version == report.version  # the same release, more architectures
    assert image.status == "pushed" and image.emulated and image.label_agreement >= 0.9
    client = docker.from_env()
    assert client.images.get(image.pinned).attrs["Architecture"] == "arm64"
    with running(client, image.pinned, "linux/arm64", 1.0, None, 240, emulated=True) as container:
        machine = container.exec("/opt/edgeloop/bin/python", "-c", "import platform; print(platform.machine())")
        assert machine == "aarch64"
        answer = container.predict(np.asarray(bundle_kit.sample[:2], np.float32))
        assert answer["version"] == f"v{report.mlflow_version}" and len(answer["predictions"]) == 2
    assert _registry_tags(images).count(image.reference.rsplit(":", 1)[1]) == 1


def test_the_armv7_image_serves_under_emulation_in_the_256mb_profile(stack, images, shipped, shipped_arm, bundle_kit):
    """The industrial class's image (linux/arm/v7): LiteRT from tflite-runtime, numpy from Debian armhf, passed the
    same gates (size, non-root, labels vs the host under a Cortex-A7 qemu in the check device's 1 CPU / 256 MB);
    run again in that profile it serves the bundle's sample, and its Python is 32-bit ARM."""
    import docker
    from tasks.packaging.docker_client import IMAGE_PYTHON, running

    report, _ = shipped
    (image,) = [image for image in shipped_arm.images if image.arch == "armv7"]
    assert image.status == "pushed" and image.emulated and image.label_agreement >= 0.9 and not image.failures
    assert image.image_mb <= 150 and image.user not in (None, "0") and image.reference.endswith("-armv7")
    attrs = docker.from_env().images.get(image.pinned).attrs
    assert (attrs["Architecture"], attrs.get("Variant")) == ("arm", "v7")
    with running(docker.from_env(), image.pinned, "linux/arm/v7", 1.0, 256, 240, emulated=True) as container:
        probe = ("import platform, numpy, edge.runtime as r; "
                 "print(platform.machine(), numpy.__file__, r.runtime_module('tflite'))")
        machine, numpy_file, litert = container.exec(IMAGE_PYTHON, "-c", probe).split()
        assert machine == "armv7l" and numpy_file.startswith("/usr/lib/python3/dist-packages/numpy/")
        assert litert == "tflite_runtime.interpreter"
        updater = container.exec(IMAGE_PYTHON, "-m", "edge.updater", "--help")  # the device's other process
        assert "--broker" in updater and "--store" in updater
        answer = container.predict(np.asarray(bundle_kit.sample[:4], np.float32))
        assert answer["version"] == f"v{report.mlflow_version}" and len(answer["predictions"]) == 4
    tags = mlflow_client(stack).get_model_version(MODEL_NAME, report.mlflow_version).tags
    assert tags["image.armv7"] == image.pinned


def test_the_docker_runner_benchmarks_in_the_shipped_images(stack, images, nightly_run, shipped, shipped_arm,
                                                            tmp_path):
    """The docker runner finds the newest packaged image per platform in the registry and runs edge.bench in
    it with the device's limits: arm64 under qemu (marked emulated, latency not gated), amd64 native."""
    import shutil

    import yaml

    from tasks.benchmark.stage import benchmark
    from tasks.workspace import Workspace

    source = Path(nightly_run.parameters["workspace"])
    for folder in ("data", "models", "reports"):
        shutil.copytree(source / folder, tmp_path / "ws" / folder)
    devices = tmp_path / "devices.yaml"
    board = {"cpu_arch": "aarch64", "cores": 2, "ram_mb": 1024, "storage_mb": 512, "power_budget_w": 5.0,
             "thermal_limit_c": 80.0, "preferred_runtime": "tflite", "latency_budget_ms": 100.0}
    devices.write_text(yaml.safe_dump({"devices": [
        {"name": "pi-like", **board, "runner": {"kind": "docker", "platform": "linux/arm64", "cpus": 2.0,
                                                "memory_mb": 512}},
        {"name": "gateway-like", **board, "cpu_arch": "x86_64",
         "runner": {"kind": "docker", "platform": "linux/amd64", "cpus": 1.0, "memory_mb": 256}},
        {"name": "armv7-like", **board, "cpu_arch": "armv7l",
         "runner": {"kind": "docker", "platform": "linux/arm/v7", "cpus": 1.0, "memory_mb": 256}}]}))
    params = _params(stack)
    params = params.model_copy(update={"benchmark": params.benchmark.model_copy(
        update={"iterations": 20, "warmup": 2, "eval_samples": 40, "retries": 0})})
    workspace = Workspace(tmp_path / "ws")
    summary = benchmark(params, workspace, devices)
    outcomes = {outcome.device: outcome for outcome in summary.devices}
    pi, gateway = ([row for row in summary.rows if row.device == name] for name in ("pi-like", "gateway-like"))
    assert all(row.status == "ok" and row.emulated and row.arch == "aarch64" for row in pi)
    assert all(any("under emulation" in note for note in row.gate_notes) for row in pi)
    assert all(row.status == "ok" and not row.emulated and row.arch == "x86_64" for row in gateway)
    assert all(row.host_agreement >= 0.9 for row in pi + gateway)
    assert outcomes["pi-like"].emulated and outcomes["pi-like"].recommended is not None
    documents = {name: json.loads(workspace.benchmark_device_file(name).read_text())
                 for name in ("pi-like", "gateway-like", "armv7-like")}
    assert documents["armv7-like"]["runner"]["image"].endswith("-armv7")
    assert documents["gateway-like"]["environment"]["memory_limit_bytes"] == 256 * 1024 * 1024
    assert documents["pi-like"]["runner"]["image"].endswith("-arm64")
    armv7 = [row for row in summary.rows if row.device == "armv7-like"]
    assert armv7 and all(row.status == "ok" and row.emulated and row.arch == "armv7l" for row in armv7)
    assert all(row.host_agreement >= 0.9 and 0 < row.peak_rss_bytes < 256 * 2**20 for row in armv7)
    assert "EMULATED" in workspace.benchmark_report("md").read_text()


def test_the_control_plane_compose_file_is_valid(images):
    env = {"POSTGRES_PASSWORD": "pw", "REDIS_PASSWORD": "bus", "MINIO_ROOT_USER": "edgeloop",
           "MINIO_ROOT_PASSWORD": "pw-pw-pw-pw"}
    completed = compose(["-f", "docker/compose.control-plane.yml", "config"], env, "edgeloop-cp")
    assert completed.returncode == 0, completed.stderr
    for service in ("postgres", "redis", "prefect-migrate", "prefect-server", "prefect-services", "mlflow",
                    "mosquitto", "registry", "prometheus"):
        assert f"  {service}:" in completed.stdout
    with_s3 = compose(["-f", "docker/compose.control-plane.yml", "-f", "docker/compose.control-plane.s3.yml",
                       "config"], env, "edgeloop-cp")
    assert with_s3.returncode == 0 and "s3://mlflow/" in with_s3.stdout and "  minio:" in with_s3.stdout
    missing = compose(["-f", "docker/compose.control-plane.yml", "config"], {}, "edgeloop-cp")
    assert missing.returncode != 0 and "set POSTGRES_PASSWORD" in missing.stderr


def test_the_edge_stack_comes_up_from_the_pushed_image(images, shipped, tmp_path):
    from tasks.stack.services import free_port

    report, _ = shipped
    token = tmp_path / "admin_token"
    token.write_text("compose-admin-token\n")
    token.chmod(0o644)  # read by the service's own user through the bind mount
    port = free_port()
    env = {"EDGELOOP_IMAGE": report.images[0].pinned, "EDGELOOP_ADMIN_TOKEN_FILE": str(token),
           "EDGELOOP_HOST_PORT": str(port), "EDGELOOP_DEVICE_ID": "compose-test"}
    project = f"edgeloop-test-{port}"
    files = ["-f", "docker/compose.edge.yml"]
    assert compose([*files, "config", "-q"], env, project).returncode == 0
    fleet = compose([*files, "--profile", "fleet", "config"], {**env, "EDGELOOP_BROKER": "broker.lan:1883"}, project)
    assert fleet.returncode == 0 and "edge.updater" in fleet.stdout and "broker.lan:1883" in fleet.stdout, fleet.stderr
    # the updater ships in the same image: its dependencies (paho-mqtt) are there and it validates its settings
    updater = subprocess.run(["docker", "run", "--rm", "--network", "none", "--entrypoint", "/opt/edgeloop/bin/python",
                              report.images[0].pinned, "-m", "edge.updater", "--broker", "x:1", "--device", "d",
                              "--group", "g", "--store", "/tmp/s", "--password-file", "/nonexistent"],
                             capture_output=True, text=True, timeout=120)
    assert updater.returncode == 2 and "/nonexistent" in updater.stderr, updater.stdout + updater.stderr
    try:
        up = compose([*files, "up", "-d"], env, project)
        assert up.returncode == 0, up.stderr
        from tests.stack_helpers import wait_for

        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _ready(url), 60, "the compose edge service")
        model = httpx.get(f"{url}/v1/model").json()
        assert model["active"] == f"v{report.mlflow_version}"
        reload = httpx.post(f"{url}/v1/model/reload", headers={"Authorization": "Bearer compose-admin-token"})
        assert reload.status_code == 200  # the token came from the secret file
    finally:
        compose([*files, "down", "--volumes", "--timeout", "5"], env, project)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_a_container_device_takes_a_new_image_only_once_it_proved_itself(images, shipped, bundle_kit, tmp_path,
                                                                          capsys):
    """The device agent (edge/agent/service.py through the updater's RolloutHandler) against the real engine and
    registry: images derived from the packaged one that crash, never get ready or serve wrong labels are each
    reported with their reason while the old container serves on; a good one replaces it. Traffic through the
    device's front runs all along and no request of it fails."""
    from dataclasses import replace

    import docker
    from edge.files import sha256_file
    from edge.rollout import RolloutManifest, sign_rollout
    from edge.signing import load_public_keys
    from edge.store.model_store import ModelStore
    from edge.updater.apply import RolloutHandler
    from edge.updater.daemon import load_config, service_container
    from tasks.registry.bundle import bundle_from_files, load_private_key
    from tasks.stack.services import free_port
    from tests.agent_helpers import Traffic, derived_image

    report, _ = shipped
    base = report.images[0].pinned
    client = docker.from_env()
    derived = {kind: derived_image(client, images.registry, base, kind) for kind in ("good", "crash", "hang", "wrong")}
    key, keys = load_private_key(images.signing_key), load_public_keys([images.public_keys])  # what the image trusts

    bundles: dict[str, Path] = {}

    def bundle(version: str) -> Path:
        if version not in bundles:
            bundles[version] = bundle_from_files(tmp_path / "bundles" / f"{version}.tar.gz", version, MODEL_NAME,
                                                 version.lstrip("v"), None,
                                                 {"primary": bundle_kit.model_files["tflite_int8"]}, bundle_kit.sample,
                                                 key)
        return bundles[version]

    store = ModelStore(tmp_path / "store", keys)
    store.install(bundle("v1000"))
    device = f"agent-test-{free_port()}"
    config = load_config(["--broker", "unused:1883", "--device", device, "--group", "images", "--store",
                          str(store.root), "--public-keys", str(images.public_keys), "--password-file", "/unused",
                          "--engine", os.environ["DOCKER_HOST"], "--service-image", base, "--service-listen",
                          f"127.0.0.1:{free_port()}", "--container-memory-mb", "512", "--ready-timeout-s", "90"],
                         environ={})
    service = service_container(config, store)  # the updater's own wiring: front, spec, binds, limits, record
    proxy, name = service.proxy, service.template.name
    statuses: list[dict] = []
    handler = RolloutHandler("device-1", "images", store, keys, lambda topic, payload, retain: statuses.append(
        json.loads(payload)), service=service, arch="amd64")
    sequence = 0

    def rollout(version: str, image: str) -> dict | None:
        nonlocal sequence
        sequence += 1
        manifest = RolloutManifest(rollout_id=f"images-{sequence}", group="images", sequence=sequence,
                                   action="install", model_name=MODEL_NAME, version=version,
                                   bundle_url=bundle(version).resolve().as_uri(),
                                   bundle_sha256=sha256_file(bundle(version)), images={"amd64": image},
                                   cohort_cutoff=1.0, issued_at=1_780_000_000.0 + sequence)
        return handler.handle(sign_rollout(manifest, key))

    def ours() -> list[str]:
        return [container.image.id for container in client.containers.list(filters={"name": name})]

    proxy.start()
    try:
        first = service.start(base)
        with Traffic(f"http://127.0.0.1:{proxy.port}", bundle_kit.sample) as traffic:
            for kind, reason, ready_timeout_s in (("crash", "image_start", 90), ("hang", "image_not_ready", 10),
                                                  ("wrong", "image_health", 90)):
                service.ready_timeout_s = ready_timeout_s
                status = rollout("v1001", derived[kind])
                assert status is not None and (status["state"], status["reason"]) == ("failed", reason), status
                assert status["version"] == "v1000" and store.state().active == "v1000"
                assert service.current == first and len(ours()) == 1, (kind, ours())
            service.ready_timeout_s = config.ready_timeout_s
            status = rollout("v1001", derived["good"])
            assert status is not None and (status["state"], status["reason"]) == ("installed", ""), status
            assert service.current.image == derived["good"] and service.current != first
            assert ours() == [client.images.get(derived["good"]).id]  # the old container is gone
            replayed = handler.handle(sign_rollout(RolloutManifest(
                rollout_id="images-1", group="images", sequence=1, action="install", model_name=MODEL_NAME,
                version="v1001", bundle_url="file:///none", bundle_sha256="0" * 64, images={"amd64": base},
                cohort_cutoff=1.0, issued_at=1.0), key))
            assert replayed is None and service.current.image == derived["good"]  # a replay never switches back
            missing = derived["good"].split("@")[0] + "@sha256:" + "0" * 64
            status = rollout("v1002", missing)
            assert status is not None and (status["state"], status["reason"]) == ("failed", "image_pull"), status
            assert status["version"] == "v1001"
        assert traffic.failures == [], traffic.failures[:5]
        assert traffic.versions["v1000"] > 0 and traffic.versions["v1001"] > 0, traffic.versions
        # the updater restarts: it takes over the recorded container and removes an attempt a killed one left
        proxy.stop()
        stray = service.engine.run(replace(service.template, image=base, name=f"{name}-{'0' * 12}-1"))
        restarted = service_container(config, store)
        proxy = restarted.proxy
        proxy.start()
        assert restarted.start(base) == service.current and ours() == [client.images.get(derived["good"]).id]
        assert not restarted.engine.running(stray.id)
        answer = httpx.post(f"http://127.0.0.1:{proxy.port}/v1/predict",
                            json={"inputs": bundle_kit.sample[:1].tolist()}).json()
        assert answer["version"] == "v1001", answer
        restarted.engine.close()
    finally:
        proxy.stop()
        if service.current is not None:
            service.engine.remove(service.current.id)
        service.engine.close()
    with capsys.disabled():
        print(f"\ncontainer device: {sum(traffic.versions.values())} requests through the front during 3 refused "
              f"and 1 accepted image updates, {len(traffic.failures)} failed; served {dict(traffic.versions)}")


def test_an_arm64_container_device_takes_its_class_release_and_its_class_rollback(images, shipped_arm64, bundle_kit,
                                                                                  tmp_path):
    """An arm64 device under qemu: the packaged arm64 image run as a container device (the updater's own wiring,
    through RolloutHandler), of class ``rpi4-8gb`` in a per-class manifest that gives the x86 gateways an ONNX
    Runtime bundle and the Pis a LiteRT one. It installs its class's bundle only and serves that variant; then
    its class's rollback entry (the gateways' stays ``install``) brings it back to its previous version."""
    from dataclasses import replace

    import docker
    from edge.files import sha256_file
    from edge.rollout import ClassRelease, RolloutManifest, sign_rollout
    from edge.signing import load_public_keys
    from edge.store.model_store import ModelStore
    from edge.updater.apply import RolloutHandler
    from edge.updater.daemon import load_config, service_container
    from tasks.packaging.docker_client import emulated_cpuinfo
    from tasks.packaging.platforms import PLATFORMS
    from tasks.registry.bundle import bundle_from_files, load_private_key
    from tasks.stack.services import free_port
    from tests.stack_helpers import wait_for

    arm = shipped_arm64
    key, keys = load_private_key(images.signing_key), load_public_keys([images.public_keys])  # what the image trusts

    def bundle(version: str, variant: str) -> tuple[str, str]:
        path = bundle_from_files(tmp_path / "bundles" / f"{version}-{variant}.tar.gz", version, MODEL_NAME,
                                 version.lstrip("v"), None, {"primary": bundle_kit.model_files[variant]},
                                 bundle_kit.sample, key)
        return path.resolve().as_uri(), sha256_file(path)

    first, pis, gateways = bundle("v2000", "tflite_int8"), bundle("v2001", "tflite_fp32"), bundle("v2001", "onnx_fp32")
    store = ModelStore(tmp_path / "store", keys)
    store.install(Path(first[0].removeprefix("file://")))
    config = load_config(["--broker", "unused:1883", "--device", "pi-arm64", "--group", "pis", "--store",
                          str(store.root), "--public-keys", str(images.public_keys), "--password-file", "/unused",
                          "--engine", os.environ["DOCKER_HOST"], "--service-image", arm.pinned, "--service-listen",
                          f"127.0.0.1:{free_port()}", "--container-memory-mb", "512", "--ready-timeout-s", "240",
                          "--device-class", "rpi4-8gb"], environ={})
    service = service_container(config, store)
    # the device's CPU under emulation (a real Pi needs none of it): qemu as a Cortex-A72 with its /proc/cpuinfo
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(emulated_cpuinfo(1))
    qemu_cpu = PLATFORMS["linux/arm64"].emulated_cpu
    service.template = replace(service.template, env={**service.template.env, "QEMU_CPU": qemu_cpu},
                               binds=[*service.template.binds, f"{cpuinfo}:/proc/cpuinfo:ro"])
    handler = RolloutHandler("pi-arm64", "pis", store, keys, lambda *_: None, service=service, arch="arm64",
                             device_class="rpi4-8gb")

    def manifest(sequence: int, pi_entry: ClassRelease) -> bytes:
        gateway_entry = ClassRelease(action="install", version="v2001", variant="onnx_fp32", runtime="onnx",
                                     bundle_url=gateways[0], bundle_sha256=gateways[1])
        return sign_rollout(RolloutManifest(
            rollout_id="classes-arm64", group="pis", sequence=sequence, action="install", model_name=MODEL_NAME,
            version="v2001", bundle_url=gateways[0], bundle_sha256=gateways[1], cohort_cutoff=1.0,
            issued_at=1_780_000_000.0 + sequence, classes={"x86-gateway": gateway_entry, "rpi4-8gb": pi_entry}), key)

    def served() -> dict:
        return httpx.get(f"http://127.0.0.1:{service.proxy.port}/v1/model", timeout=30).json()

    service.proxy.start()
    try:
        service.start(arm.pinned)
        assert docker.from_env().images.get(arm.pinned).attrs["Architecture"] == "arm64"
        status = handler.handle(manifest(1, ClassRelease(
            action="install", version="v2001", variant="tflite_fp32", runtime="tflite", bundle_url=pis[0],
            bundle_sha256=pis[1], images={"arm64": arm.pinned})))
        assert status is not None and (status["state"], status["version"]) == ("installed", "v2001"), status
        assert (status["variant"], status["device_class"]) == ("tflite_fp32", "rpi4-8gb")
        assert (served()["serving"], served()["variant"], served()["runtime"]) == ("v2001", "tflite_fp32", "tflite")
        status = handler.handle(manifest(2, ClassRelease(
            action="rollback", version="v2000", variant="tflite_int8", runtime="tflite", bundle_url=first[0],
            bundle_sha256=first[1], reason="the Pis' canary was unhealthy")))
        assert status is not None and (status["state"], status["version"]) == ("installed", "v2000"), status
        # the service sees the store's active version change on its next watch (slower under emulation)
        wait_for(lambda: served()["serving"] == "v2000", 120, "the arm64 service to serve v2000 again")
        assert served()["variant"] == "tflite_int8"
    finally:
        service.proxy.stop()
        if service.current is not None:
            service.engine.remove(service.current.id)
        service.engine.close()


def test_a_service_killed_for_memory_comes_back_by_its_restart_policy_with_its_store_intact(images, shipped,
                                                                                            bundle_kit, tmp_path):
    """The updater's service container (its own wiring) under a memory limit lowered step by step until the
    kernel kills the service once: the engine restarts it by the container's policy (no agent involved), and
    once the limit is back the same container serves the same version from a store whose every file is as it
    was (the store is only read while serving)."""
    import docker
    from edge.files import sha256_file
    from edge.signing import load_public_keys
    from edge.store.model_store import ModelStore
    from edge.updater.daemon import load_config, service_container
    from tasks.registry.bundle import bundle_from_files, load_private_key
    from tasks.stack.services import free_port
    from tests.stack_helpers import wait_for

    report, _ = shipped
    base = report.images[0].pinned
    keys = load_public_keys([images.public_keys])
    store = ModelStore(tmp_path / "store", keys)
    store.install(bundle_from_files(tmp_path / "v1000.tar.gz", "v1000", MODEL_NAME, "1000", None,
                                    {"primary": bundle_kit.model_files["tflite_int8"]}, bundle_kit.sample,
                                    load_private_key(images.signing_key)))
    config = load_config(["--broker", "unused:1883", "--device", f"oom-test-{free_port()}", "--group", "images",
                          "--store", str(store.root), "--public-keys", str(images.public_keys), "--password-file",
                          "/unused", "--engine", os.environ["DOCKER_HOST"], "--service-image", base,
                          "--service-listen", f"127.0.0.1:{free_port()}", "--container-memory-mb", "256"], environ={})
    service = service_container(config, store)
    files = sorted(path for path in (store.root / "versions").rglob("*") if path.is_file())
    before = {path: sha256_file(path) for path in [*files, store.state_file]}
    front = f"http://127.0.0.1:{service.proxy.port}"

    def serves() -> str | None:
        try:
            answer = httpx.post(f"{front}/v1/predict", json={"inputs": bundle_kit.sample[:2].tolist()}, timeout=5)
            return answer.json()["version"] if answer.status_code == 200 else None
        except (httpx.HTTPError, ValueError, KeyError):
            return None

    client = docker.from_env()
    service.proxy.start()
    running = None
    try:
        running = service.start(base)
        container = client.containers.get(running.id)
        assert container.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
        assert wait_for(serves, 60, "the service") == "v1000"
        killed_at = None
        for limit_mb in (128, 96, 64, 48, 32, 24, 16):  # lowered until the service is killed once (RSS ~62 MB)
            container.stop(timeout=10)  # a running container's limit cannot go below its usage on cgroup v1
            container.update(mem_limit=f"{limit_mb}m", memswap_limit=f"{limit_mb}m")
            container.start()
            outcome = wait_for(lambda: "killed" if client.containers.get(running.id).attrs["RestartCount"] else
                               ("serving" if serves() else None), 90, f"the service under {limit_mb} MB")
            if outcome == "killed":
                killed_at = limit_mb
                break
        assert killed_at is not None, "the service was never killed for memory down to 16 MB"
        print(f"the service was killed for memory under {killed_at} MB and restarted by its policy")
        container.update(mem_limit="256m", memswap_limit="256m")  # the policy's next restart comes up
        assert wait_for(serves, 180, "the service restarted by its policy") == "v1000"
        container.reload()
        assert container.id == running.id and container.attrs["RestartCount"] >= 1
        assert container.attrs["State"]["Running"] and container.attrs["HostConfig"]["Memory"] == 256 * 2**20
        assert {path: sha256_file(path) for path in before} == before and store.state().active == "v1000"
        assert ModelStore(store.root, keys).load("v1000").manifest.version == "v1000"  # verifies signature + files
    finally:
        if running is not None:
            service.engine.remove(running.id)
        service.proxy.stop()


def test_a_platform_missing_a_package_is_named_and_the_others_ship_only_in_a_partial_release(stack, images, shipped,
                                                                                            tmp_path, monkeypatch):
    """armv7's LiteRT wheel renamed to one no index has (the stand-in for a wheel that does not exist for a
    platform; pip's refusal is real): the error names the package and the platform. All or nothing by default:
    the amd64 image still builds and passes, and nothing is pushed; with ``package.partial_release`` amd64 is
    pushed and recorded on the version, and armv7 is reported not built."""
    from dataclasses import replace

    from tasks.errors import PackagingError
    from tasks.packaging import platforms
    from tasks.packaging.package import package
    from tasks.workspace import Workspace

    report, _ = shipped
    missing = replace(platforms.PLATFORMS["linux/arm/v7"], runtimes={"tflite": "tflite-runtime-missing"})
    monkeypatch.setitem(platforms.PLATFORMS, "linux/arm/v7", missing)
    settings = {"repository": "edgeloop/partial-check", "platforms": ["linux/amd64", "linux/arm/v7"]}
    with pytest.raises(PackagingError) as failure:
        package(_params(stack, **settings), Workspace(tmp_path / "all"), version=report.mlflow_version)
    message = str(failure.value)
    assert "tflite-runtime-missing is not available for linux/arm/v7" in message and "nothing was pushed" in message
    assert "partial_release" in message and _registry_tags(images, "edgeloop/partial-check") == []
    written = json.loads((tmp_path / "all" / "reports" / "package.json").read_text())
    assert {image["arch"]: image["status"] for image in written["images"]} == {"amd64": "not_pushed",
                                                                               "armv7": "not_built"}

    partial = package(_params(stack, partial_release=True, **settings), Workspace(tmp_path / "partial"),
                      version=report.mlflow_version)
    amd64, armv7 = sorted(partial.images, key=lambda image: image.arch)
    assert amd64.status == "pushed" and armv7.status == "not_built"
    assert "tflite-runtime-missing" in armv7.failures[0] and "linux/arm/v7" in armv7.failures[0]
    assert _registry_tags(images, "edgeloop/partial-check") == [amd64.reference.rsplit(":", 1)[1]]
    tags = mlflow_client(stack).get_model_version(MODEL_NAME, report.mlflow_version).tags
    assert tags["image.amd64"] == amd64.pinned
