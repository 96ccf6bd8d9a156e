"""Per-device-class releases end to end: a real MLflow registry (SQLite), a real Mosquitto, and devices of two
classes (the real edge service and updater each, serving traffic), each class able to run one runtime only:
``x86-gateway`` devices ONNX Runtime, ``rpi4-8gb`` devices LiteRT (as a device image with one runtime would).

1. Version 2 chose ``onnx_fp32`` for the gateways and ``tflite_fp32`` for the Pis (each class's preferred
   runtime, devices.yaml): one rollout, a canary per class, and every device ends serving its class's variant;
   the Jetson class (also ONNX) shares the gateways' bundle file, and each class's variant loads as a pyfunc model.
   The Pis were measured best on LiteRT without XNNPACK (the ``device.rpi4-8gb.runtime_options`` tag the register
   stage writes for such a benchmark pick): their bundle asks for it and they serve that way.
2. Version 3's LiteRT variant is under-confident, its ONNX one is fine: the Pis' canary trips the confidence
   limit and only the Pis go back to version 2; the gateways complete; the version is tagged ``partial``.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.conftest import require_system_tools
from tests.integration.test_rollout import _softened
from tests.registry_helpers import TEST, prepare_class_run, sqlite_tracking
from tests.stack_helpers import wait_for

pytestmark = pytest.mark.integration
GROUP = "classes"
GATEWAY, PI = "x86-gateway", "rpi4-8gb"
DEVICES = {"gw-0": (GATEWAY, "onnx"), "gw-1": (GATEWAY, "onnx"), "pi-0": (PI, "tflite"), "pi-1": (PI, "tflite")}
SLOW_HOST_S = 90
NO_XNNPACK = '{"config": "no-xnnpack", "xnnpack": false}'


@pytest.fixture(scope="module")
def class_registry(tmp_path_factory, tiny_model, tiny_model_files, digits, bundle_kit):
    """Versions 1-3 in a SQLite MLflow, each with a LiteRT and an ONNX variant (version 3's LiteRT one softened)."""

    import mlflow

    from tasks.config import Params
    from tasks.contracts import Workspace
    from tasks.model import exporters
    from tasks.registry.register import register

    root = tmp_path_factory.mktemp("class-registry")
    bad = root / "bad_int8.tflite"
    bad.write_bytes(exporters.tflite_bytes(_softened(tiny_model, 0.15), "int8", digits.x[:50]))
    versions = [{"tflite_int8": tiny_model_files["tflite_int8"], "onnx_int8": tiny_model_files["onnx_int8"]},
                {"tflite_fp32": tiny_model_files["tflite_fp32"], "onnx_fp32": tiny_model_files["onnx_fp32"]},
                {"tflite_int8": bad, "onnx_fp32": tiny_model_files["onnx_fp32"]}]
    with sqlite_tracking(root) as tracking_uri:
        params = Params.model_validate({
            "drift": {"reference_rows": 100}, "retrain": {"labelled_dir": str(root / "none")},
            "mlflow": {"tracking_uri": tracking_uri},
            "package": {"signing_key": str(bundle_kit.root / "keys" / "private" / "test-signer.key"),
                        "public_keys": str(bundle_kit.public_dir)},
            "rollout": {"bundle_dir": str(root / "bundles"), "group": GROUP}})
        for index, files in enumerate(versions):
            workspace = Workspace(root / f"run{index}")
            register(params, workspace, *prepare_class_run(workspace, digits, files, TEST))
        mlflow.MlflowClient().set_model_version_tag(params.mlflow.registered_model, "2",
                                                    f"device.{PI}.runtime_options", NO_XNNPACK)
        yield params


@pytest.fixture(scope="module")
def class_fleet(tmp_path_factory, class_registry, bundle_kit, digits):
    """The broker (password logins) and the four devices, each provisioned with its class's bundle of version 1."""
    from scripts.device_fleet import DeviceFleet
    from tasks.rollout import fleet as fleet_files
    from tasks.rollout.records import release_of
    from tasks.stack import mosquitto, services

    require_system_tools("mosquitto", packages="mosquitto")
    root = tmp_path_factory.mktemp("class-fleet")
    credentials = root / "credentials"
    passwords = {device: fleet_files.add_device(credentials / "fleet.yaml", credentials, device, GROUP,
                                                iterations=2, device_class=device_class)
                 for device, (device_class, _) in DEVICES.items()}
    control_password = fleet_files.ensure_control_plane(credentials)
    broker = mosquitto.start_mosquitto(root / "run", services.free_port(), credentials / fleet_files.PASSWORD_FILE,
                                       credentials / fleet_files.ACL_FILE)
    address = f"127.0.0.1:{broker.port}"
    first = release_of(class_registry, "1")
    devices = DeviceFleet(root / "devices", address, GROUP, bundle_kit.public_dir)
    try:
        for device, (device_class, runtime) in DEVICES.items():
            bundle = Path(first.classes[device_class].bundle_url.removeprefix("file://"))
            devices.start(device, passwords[device], bundle,
                          updater_args=("--device-class", device_class, "--runtimes", runtime))
        wait_for(lambda: set(devices.versions().values()) == {"v1"}, SLOW_HOST_S, "every device to serve v1")
        with devices.traffic(digits.x[1200:1500], rate_per_device_hz=8.0):
            yield devices, address, control_password, credentials / "fleet.yaml"
    finally:
        try:
            devices.stop()
        finally:
            mosquitto.stop_mosquitto(root / "run")


def _served(device, field: str = "variant"):
    try:
        return httpx.get(f"{device.url}/v1/model", timeout=5.0).json().get(field)
    except (httpx.HTTPError, ValueError):
        return None


def _roll(class_registry, address, control_password, fleet_file, bundle_kit, target: str, previous: str):
    from tasks.config import RolloutParams
    from tasks.registry.bundle import load_private_key
    from tasks.rollout.channel import MqttChannel
    from tasks.rollout.classes import ClassRollout
    from tasks.rollout.fleet import CONTROL_PLANE_USER, load_fleet
    from tasks.rollout.records import record_outcome, release_of

    params = RolloutParams(group=GROUP, stages=[50, 100], stage_window_s=3, ack_timeout_s=SLOW_HOST_S, jitter_s=0.5,
                           max_missing_fraction=0.5, baseline_window_s=30, max_confidence_drop=0.2,
                           min_p95_increase_ms=60_000)  # live latency on a busy host is no signal here
    with MqttChannel(address, GROUP, CONTROL_PLANE_USER, control_password, bundle_kit.trusted_keys()) as channel:
        wait_for(lambda: {s["device"] for s in channel.telemetry_since(0.0)
                          if s["version"] == f"v{previous}" and s["requests"] > 0} == set(DEVICES),
                 SLOW_HOST_S, f"v{previous} telemetry from every device")
        report = ClassRollout(channel, load_fleet(fleet_file).classes(GROUP), load_private_key(
            class_registry.package.signing_key), params, class_registry.drift, class_registry.mlflow.registered_model,
            release_of(class_registry, target), release_of(class_registry, previous), poll_s=0.2).run()
        statuses = channel.statuses()
    record_outcome(class_registry.mlflow, report)
    return report, statuses


def test_each_class_serves_its_variant_and_a_bad_one_is_rolled_back_in_its_class_only(class_registry, class_fleet,
                                                                                    bundle_kit, digits):
    import mlflow
    import numpy as np

    from tasks.rollout.records import release_of

    devices, address, control_password, fleet_file = class_fleet
    client, name = mlflow.MlflowClient(), class_registry.mlflow.registered_model

    # ---- the release: one bundle per distinct variant, each class's variant a pyfunc model -------------------
    second = release_of(class_registry, "2")
    assert second.classes[GATEWAY].variant == "onnx_fp32" and second.classes[PI].variant == "tflite_fp32"
    assert second.classes["jetson-xavier-nx"].bundle_url == second.classes[GATEWAY].bundle_url  # shared, not rebuilt
    # the registered variant, but in another configuration than LiteRT's default: a bundle of its own
    assert second.classes[PI].bundle_url.endswith("-v2-tflite_fp32-no-xnnpack.tar.gz")
    assert second.classes[PI].bundle_url != second.bundle_url
    assert second.classes[GATEWAY].bundle_sha256 != second.classes[PI].bundle_sha256
    tags = client.get_model_version(name, "2").tags
    pyfunc = mlflow.pyfunc.load_model(tags[f"device.{GATEWAY}.model_uri"])
    assert np.asarray(pyfunc.predict(digits.x[:4].astype(np.float32))).shape == (4, 10)

    # ---- 1: version 2, a canary in each class, each device on its class's variant ---------------------------
    report, statuses = _roll(class_registry, address, control_password, fleet_file, bundle_kit, "2", "1")
    assert report.outcome == "completed", report.reason
    for device_class in (GATEWAY, PI):
        stages = [stage for stage in report.stages if stage.device_class == device_class]
        assert [len(stage.devices) for stage in stages] == [1, 2]  # the canary is one of its own class
        assert all(stage.figures.requests > 0 for stage in stages)  # judged on its own class's traffic
    wait_for(lambda: set(devices.versions().values()) == {"v2"}, SLOW_HOST_S, "every device to serve v2")
    for device_id, (device_class, _) in DEVICES.items():
        assert _served(devices.devices[device_id]) == second.classes[device_class].variant
        configuration = _served(devices.devices[device_id], "config"), _served(devices.devices[device_id],
                                                                               "accelerators")
        assert configuration == (("no-xnnpack", []) if device_class == PI else ("default", [])), device_id
        assert statuses[device_id]["device_class"] == device_class
        assert statuses[device_id]["variant"] == second.classes[device_class].variant
    assert client.get_model_version(name, "2").tags[f"rollout.class.{PI}"] == "completed"

    # ---- 2: version 3's LiteRT variant is under-confident: only the Pis go back ------------------------------
    report, _ = _roll(class_registry, address, control_password, fleet_file, bundle_kit, "3", "2")
    assert report.outcome == "partial", report.reason
    assert report.classes[PI].outcome == "rolled_back" and "mean confidence" in report.classes[PI].reason
    assert report.classes[GATEWAY].outcome == "completed"
    wait_for(lambda: devices.versions() == {"gw-0": "v3", "gw-1": "v3", "pi-0": "v2", "pi-1": "v2"}, SLOW_HOST_S,
             "the gateways on v3 and the Pis back on v2")
    assert {_served(devices.devices[d]) for d in ("pi-0", "pi-1")} == {"tflite_fp32"}
    tags = client.get_model_version(name, "3").tags
    assert tags["rollout"] == "partial" and tags[f"rollout.class.{PI}"].startswith("rolled-back: ")
    assert tags[f"rollout.class.{GATEWAY}"] == "completed"
