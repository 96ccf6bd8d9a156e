"""Per-device-class releases: the lanes of a rollout against the in-memory fleet, and a device's updater judging
a per-class manifest with real signed bundles and a real store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.files import sha256_file
from edge.rollout import ClassRelease, RolloutManifest, resolve_class, sign_rollout
from edge.store.model_store import ModelStore
from edge.updater.apply import RolloutHandler
from tasks.config import DriftParams, RolloutParams
from tasks.rollout.classes import ClassRollout
from tasks.rollout.engine import Release
from tests.unit.rollout_fakes import HEALTHY, V1, Clock, Fleet

GATEWAY, PI = "x86-gateway", "rpi4-8gb"


def _release(version: str, variants: dict[str, tuple[str, str]], held: dict[str, str] | None = None) -> Release:
    classes = {name: Release(version, f"file:///bundles/{version}-{variant}.tar.gz", f"{index + 1}" * 64,
                             variant=variant, runtime=runtime)
               for index, (name, (variant, runtime)) in enumerate(sorted(variants.items()))}
    return Release(version, f"file:///bundles/{version}.tar.gz", "f" * 64, variant="tflite_int8", runtime="tflite",
                   classes=classes, held=held or {})


V2 = _release("v2", {GATEWAY: ("onnx_int8_u8s8", "onnx"), PI: ("tflite_int8", "tflite")})
V1_CLASSES = _release("v1", {GATEWAY: ("onnx_fp32", "onnx"), PI: ("tflite_fp32", "tflite")})


@pytest.fixture
def key():
    return Ed25519PrivateKey.generate()


def _class_rollout(fleet: Fleet, key, clock: Clock, target: Release = V2, previous: Release | None = V1_CLASSES):
    params = RolloutParams(stage_window_s=5, ack_timeout_s=30, jitter_s=0)
    return ClassRollout(fleet, dict(fleet.device_class), key, params, DriftParams(), "edgeloop-digits", target,
                        previous, clock=clock, sleep=clock.sleep, poll_s=1.0)


def test_each_class_gets_its_own_variant_and_its_own_canary(key):
    clock = Clock()
    fleet = Fleet(key, 0, clock, classes={GATEWAY: 20, PI: 40})
    report = _class_rollout(fleet, key, clock).run()
    assert report.outcome == "completed", report.reason
    assert set(fleet.active.values()) == {"v2"}
    assert {fleet.variant[d] for d in fleet.active if d.startswith(GATEWAY)} == {"onnx_int8_u8s8"}
    assert {fleet.variant[d] for d in fleet.active if d.startswith(PI)} == {"tflite_int8"}
    for name, members in ((GATEWAY, 20), (PI, 40)):
        stages = [stage for stage in report.stages if stage.device_class == name]
        assert [len(stage.devices) for stage in stages] == [-(-members * 5 // 100), -(-members * 25 // 100),
                                                            members]  # 5% of each class: every class has a canary
        assert all(device.startswith(name) for stage in stages for device in stage.devices)
        assert report.classes[name].outcome == "completed"
    last = fleet.published[-1]
    assert set(last.classes) == {GATEWAY, PI} and last.classes[GATEWAY].runtime == "onnx"
    assert [m.sequence for m in fleet.published] == list(range(1, 7))  # one manifest per change, any lane


def test_every_lane_runs_in_the_callers_context(key):
    """The flow's run context and Prefect settings are context variables: each lane thread sees the caller's."""
    import contextvars

    caller = contextvars.ContextVar("caller", default="a bare thread")
    seen: list[str] = []
    clock = Clock()
    fleet = Fleet(key, 0, clock, classes={GATEWAY: 4, PI: 4})
    rollout = _class_rollout(fleet, key, clock)
    for lane in rollout.lanes.values():
        lane.on_step = lambda step: seen.append(caller.get())
    caller.set("the flow run")
    assert rollout.run().outcome == "completed"
    assert seen and set(seen) == {"the flow run"}


def test_a_slower_class_is_rolled_back_alone_while_the_faster_one_completes(key):
    clock = Clock()  # pooled with the gateways' 2 ms, the Pis' slowdown would vanish in the fleet's p95
    fleet = Fleet(key, 0, clock, classes={GATEWAY: 30, PI: 10},
                  figures={(GATEWAY, "v1"): {**HEALTHY, "p95_ms": 2.0}, (GATEWAY, "v2"): {**HEALTHY, "p95_ms": 2.0},
                           (PI, "v1"): {**HEALTHY, "p95_ms": 40.0}, (PI, "v2"): {**HEALTHY, "p95_ms": 90.0}})
    report = _class_rollout(fleet, key, clock).run()
    assert report.outcome == "partial"
    assert report.classes[PI].outcome == "rolled_back" and "p95 latency 90.0 ms" in report.classes[PI].reason
    assert report.classes[GATEWAY].outcome == "completed"
    assert {fleet.active[d] for d in fleet.active if d.startswith(PI)} == {"v1"}
    assert {fleet.active[d] for d in fleet.active if d.startswith(GATEWAY)} == {"v2"}
    canary = next(stage for stage in report.stages if stage.device_class == PI).devices
    assert {fleet.variant[d] for d in canary} == {"tflite_fp32"}  # rolled back to the Pis' own v1 bundle
    rollback = [stage for stage in report.stages if stage.action == "rollback"]
    assert [stage.device_class for stage in rollback] == [PI]
    assert fleet.published[-1].classes[PI].action == "rollback"


def test_a_class_without_a_variant_is_held_and_an_unknown_class_refuses(key):
    clock = Clock()
    target = _release("v2", {GATEWAY: ("onnx_int8_u8s8", "onnx")},
                      held={"industrial-256mb": "measured: no variant passes every device gate on it"})
    fleet = Fleet(key, 0, clock, classes={GATEWAY: 10, "industrial-256mb": 4, "jetson-xavier-nx": 3})
    report = _class_rollout(fleet, key, clock, target).run()
    assert report.outcome == "completed" and report.classes[GATEWAY].outcome == "completed"
    held, unknown = report.classes["industrial-256mb"], report.classes["jetson-xavier-nx"]
    assert held.outcome == "held" and "no variant passes" in held.reason
    assert unknown.outcome == "held" and "names no variant for class jetson-xavier-nx" in unknown.reason
    for device in fleet.active:
        if not device.startswith(GATEWAY):
            assert fleet.active[device] == "v1"
    assert all("industrial" not in d for d in fleet.status)  # held: nothing to do, nothing to report
    assert {fleet.status[d]["reason"] for d in fleet.status if d.startswith("jetson")} == {"unknown_class"}
    assert fleet.published[0].classes["industrial-256mb"].action == "hold"


def test_a_group_with_no_class_the_release_serves_fails_clearly(key):
    clock = Clock()
    fleet = Fleet(key, 0, clock, classes={"jetson-xavier-nx": 3})
    report = _class_rollout(fleet, key, clock).run()
    assert report.outcome == "failed" and "no device class of the group has a variant" in report.reason
    assert fleet.published == []


def test_class_entries_are_validated():
    with pytest.raises(ValueError, match="needs version, runtime, bundle_url and bundle_sha256"):
        ClassRelease(action="install", version="v2")
    with pytest.raises(ValueError, match="must say why"):
        ClassRelease(action="hold")
    with pytest.raises(ValueError, match="a device class is a devices.yaml name"):
        RolloutManifest(rollout_id="r", group="lab", sequence=1, action="install", model_name="m", version="v2",
                        bundle_url="file:///b", bundle_sha256="a" * 64, cohort_cutoff=1.0, issued_at=0.0,
                        classes={"Bad_Class": ClassRelease(action="hold", reason="x")})



@pytest.mark.parametrize(("field", "value"), [("group", "lab/+#"), ("group", "lab extra"),
                                              ("bundle_sha256", "x" + "a" * 64), ("bundle_sha256", "a" * 64 + "\n")])
def test_a_group_or_digest_with_anything_around_it_is_refused(field, value):
    """The whole text must match (a group is one MQTT topic level; a digest is 64 hex digits, nothing else)."""
    fields = {"rollout_id": "r", "group": "lab", "sequence": 1, "action": "install", "model_name": "m",
              "version": "v2", "bundle_url": "file:///b", "bundle_sha256": "a" * 64, "cohort_cutoff": 1.0,
              "issued_at": 0.0}
    RolloutManifest(**fields)
    with pytest.raises(ValueError, match=field):
        RolloutManifest(**{**fields, field: value})
    if field == "bundle_sha256":
        with pytest.raises(ValueError, match=field):
            ClassRelease(action="install", version="v2", runtime="tflite", bundle_url="file:///b", bundle_sha256=value)


# ---- the device side --------------------------------------------------------------------------------------

def _manifest(bundles: dict[str, Path], sequence: int, **entries: ClassRelease) -> RolloutManifest:
    return RolloutManifest(rollout_id="r1", group="lab", sequence=sequence, action="install",
                           model_name="edgeloop-digits", version="v2", bundle_url=bundles["tflite"].as_uri(),
                           bundle_sha256=sha256_file(bundles["tflite"]), cohort_cutoff=1.0, issued_at=1.0,
                           classes=entries)


def _entry(bundle: Path, variant: str, runtime: str) -> ClassRelease:
    return ClassRelease(action="install", version="v2", variant=variant, runtime=runtime,
                        bundle_url=bundle.as_uri(), bundle_sha256=sha256_file(bundle))


@pytest.fixture(scope="module")
def class_bundles(bundle_kit) -> dict[str, Path]:
    return {"tflite": bundle_kit.bundle("v2", "tflite_int8", name="class-v2-tflite.tar.gz"),
            "onnx": bundle_kit.bundle("v2", "onnx_int8", name="class-v2-onnx.tar.gz")}


def _device(tmp_path, bundle_kit, device_class, runtimes=("tflite", "onnx")):
    published = []
    store = ModelStore(tmp_path / "store", bundle_kit.trusted_keys())
    handler = RolloutHandler("device-1", "lab", store, bundle_kit.trusted_keys(),
                             lambda topic, payload, retain: published.append(json.loads(payload)),
                             clock=lambda: 1.0, device_class=device_class, runtimes=runtimes)
    return handler, store, published


def test_a_device_installs_its_own_classs_bundle_and_says_which_variant(tmp_path, bundle_kit, class_bundles):
    handler, store, published = _device(tmp_path, bundle_kit, GATEWAY)
    manifest = _manifest(class_bundles, 1, **{GATEWAY: _entry(class_bundles["onnx"], "onnx_int8", "onnx"),
                                             PI: _entry(class_bundles["tflite"], "tflite_int8", "tflite")})
    status = handler.handle(sign_rollout(manifest, bundle_kit.private_key))
    assert status["state"] == "installed" and status["variant"] == "onnx_int8" and status["device_class"] == GATEWAY
    assert store.state().active == "v2" and store.load("v2").primary.runtime == "onnx"
    assert published == [status]


@pytest.mark.parametrize(("device_class", "runtimes", "refusal"), [
    (None, ("tflite", "onnx"), "no_class"),
    ("jetson-xavier-nx", ("tflite", "onnx"), "unknown_class"),
    (GATEWAY, ("tflite",), "wrong_runtime"),  # its class's bundle needs ONNX Runtime, which it lacks
])
def test_a_device_refuses_what_is_not_for_its_class_and_keeps_serving(tmp_path, bundle_kit, class_bundles,
                                                                      bundles_v1, device_class, runtimes, refusal):
    handler, store, published = _device(tmp_path, bundle_kit, device_class, runtimes)
    store.install(bundles_v1)
    manifest = _manifest(class_bundles, 1, **{GATEWAY: _entry(class_bundles["onnx"], "onnx_int8", "onnx")})
    status = handler.handle(sign_rollout(manifest, bundle_kit.private_key))
    assert status["state"] == "refused" and status["reason"] == refusal and status["version"] == "v1"
    assert store.state().active == "v1" and store.state().installed == ["v1"]
    assert handler.handle(sign_rollout(manifest, bundle_kit.private_key)) is None  # the same sequence: stale


def test_a_held_class_does_nothing_and_reports_nothing(tmp_path, bundle_kit, class_bundles):
    handler, store, published = _device(tmp_path, bundle_kit, PI)
    manifest = _manifest(class_bundles, 1, **{GATEWAY: _entry(class_bundles["onnx"], "onnx_int8", "onnx"),
                                             PI: ClassRelease(action="hold", reason="no variant passes its gates")})
    assert handler.handle(sign_rollout(manifest, bundle_kit.private_key)) is None
    assert published == [] and store.state().active is None


def test_resolve_class_leaves_whole_fleet_manifests_alone(class_bundles):
    manifest = _manifest(class_bundles, 1)
    assert resolve_class(manifest, GATEWAY, ("tflite",)) == (manifest, None, "")
    assert V1.classes == {}


@pytest.fixture(scope="module")
def bundles_v1(bundle_kit) -> Path:
    return bundle_kit.bundle("v1", name="class-v1.tar.gz")


def test_the_flow_rolls_out_per_class_only_when_every_device_has_a_class(key):
    from flows.rollout import rollout_for
    from tasks.config import Params
    from tasks.rollout.engine import Rollout

    clock, params = Clock(), Params()
    fleet = Fleet(key, 0, clock, classes={GATEWAY: 2, PI: 2})
    classed = rollout_for(fleet, dict(fleet.device_class), key, params, V2, V1_CLASSES, None)
    assert isinstance(classed, ClassRollout) and set(classed.lanes) == {GATEWAY, PI}
    whole = rollout_for(fleet, dict.fromkeys(fleet.device_class), key, params, V2, V1_CLASSES, None)
    assert isinstance(whole, Rollout) and whole.target is V2  # no device has a class: the version's own bundle
    older = rollout_for(fleet, dict(fleet.device_class), key, params, V1, None, None)
    assert isinstance(older, Rollout)  # registered before per-class choices


def test_exporting_a_class_bundle_names_what_is_missing():
    from tasks.errors import ConfigError
    from tasks.registry.bundle import class_variant

    tags = {"variant": "tflite_int8", f"device.{GATEWAY}.variant": "onnx_int8", f"device.{GATEWAY}.rule": "benchmark",
            "device.industrial-256mb.variant": "none", "device.industrial-256mb.rule": "none"}
    assert class_variant(tags, GATEWAY, "m", "4") == "onnx_int8"
    with pytest.raises(ConfigError, match="has no variant for device class 'industrial-256mb': none rule"):
        class_variant(tags, "industrial-256mb", "m", "4")
    with pytest.raises(ConfigError, match=f"chose no variant for device class 'rpi4-8gb' \\(it knows "
                                          f"industrial-256mb, {GATEWAY}\\)"):
        class_variant(tags, PI, "m", "4")
    with pytest.raises(ConfigError, match="registered before per-class releases"):
        class_variant({"variant": "tflite_int8"}, PI, "m", "1")


def test_a_per_class_release_needs_one_image_per_variant_and_platform():
    from tasks.devices import load_devices
    from tasks.packaging.class_images import class_images_of, image_targets

    tags = {"device.rpi4-8gb.variant": "tflite_int8", "device.jetson-xavier-nx.variant": "onnx_int8_u8s8",
            "device.x86-gateway.variant": "onnx_int8_u8s8", "device.industrial-256mb.variant": "tflite_int8"}
    targets = image_targets(tags, load_devices(), ["linux/amd64", "linux/arm64"], "tflite_int8")
    assert list(targets) == ["tflite_int8", "onnx_int8_u8s8"]  # the registered variant first
    assert targets["tflite_int8"] == {"linux/amd64": [], "linux/arm64": ["rpi4-8gb"]}  # armv7: no image yet
    assert targets["onnx_int8_u8s8"] == {"linux/arm64": ["jetson-xavier-nx"], "linux/amd64": ["x86-gateway"]}
    only_amd64 = image_targets({**tags, "device.rpi4-8gb.variant": "none"}, load_devices(), ["linux/amd64"],
                               "tflite_int8")
    assert only_amd64 == {"tflite_int8": {"linux/amd64": []}, "onnx_int8_u8s8": {"linux/amd64": ["x86-gateway"]}}
    pinned = "registry.lan:5000/edgeloop/edge@sha256:" + "a" * 64
    assert class_images_of({f"device.{GATEWAY}.image.amd64": pinned, f"device.{GATEWAY}.image.arm64": "latest",
                            f"device.{PI}.image.arm64": pinned}, GATEWAY) == {"amd64": pinned}  # pinned only
