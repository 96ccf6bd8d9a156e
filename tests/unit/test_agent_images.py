"""The image part of a rollout, without an engine: the manifest's ``images`` (signed, pinned by digest, left out of
the text when empty so older devices keep taking model-only rollouts), the control plane's ``image.<arch>`` tags,
what the updater does when its service container refuses an image (the store goes back, the failure is
reported), the container device's settings, and the health check's verdicts. The real engine, registry and
derived images: tests/integration/test_package.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge.agent.service import _health_problem
from edge.files import sha256_file
from edge.rollout import RolloutManifest, sign_rollout, verify_rollout
from edge.schema import SchemaError
from edge.store.model_store import ModelStore
from edge.updater.apply import RolloutHandler
from edge.updater.daemon import load_config
from edge.updater.fetch import RolloutFailed
from tasks.rollout.records import images_of

DIGEST = "sha256:" + "ab" * 32
GOOD = f"registry.lan:5000/edgeloop/edge@{DIGEST}"


def manifest(bundle: Path, version: str, sequence: int, **changes) -> RolloutManifest:
    fields = {"rollout_id": "r1", "group": "lab", "sequence": sequence, "action": "install",
              "model_name": "edgeloop-digits", "version": version, "bundle_url": bundle.as_uri(),
              "bundle_sha256": sha256_file(bundle), "cohort_cutoff": 1.0, "issued_at": 1.0}
    return RolloutManifest(**{**fields, **changes})


@pytest.mark.parametrize("images", [{"amd64": "registry.lan:5000/edgeloop/edge:latest"},  # a tag moves: refused
                                    {"amd64": f"edgeloop/edge@sha256:{'ab' * 16}"},  # a short digest
                                    {"AMD64 ": GOOD}, {f"a{i}": GOOD for i in range(9)}])
def test_an_image_not_pinned_by_digest_or_a_bad_architecture_never_validates(tmp_path, images) -> None:
    bundle = tmp_path / "b.tar.gz"
    bundle.write_bytes(b"x")
    with pytest.raises(SchemaError, match="images"):
        manifest(bundle, "v1", 1, images=images)


def test_images_are_signed_and_left_out_of_the_text_when_there_are_none(tmp_path, bundle_kit) -> None:
    bundle = tmp_path / "b.tar.gz"
    bundle.write_bytes(b"x")
    plain = manifest(bundle, "v1", 1)
    assert "images" not in json.loads(plain.to_text())  # byte-compatible with devices that predate the field
    with_images = manifest(bundle, "v1", 1, images={"amd64": GOOD})
    payload = sign_rollout(with_images, bundle_kit.private_key)
    verified = verify_rollout(payload, bundle_kit.trusted_keys())
    assert verified.image_for("amd64") == GOOD and verified.image_for("arm64") is None
    envelope = json.loads(payload)
    envelope["manifest"] = envelope["manifest"].replace("ab" * 32, "cd" * 32)  # another image, same signature
    with pytest.raises(Exception, match="signature"):
        verify_rollout(json.dumps(envelope).encode(), bundle_kit.trusted_keys())


def test_the_control_plane_takes_only_pushed_images_pinned_by_digest_from_the_version_tags() -> None:
    tags = {"image.amd64": GOOD, "image.arm64": f"registry.lan:5000/edgeloop/edge@{'sha256:' + 'cd' * 32}",
            "image.version": "1.4.0", "image.package_run_id": "abc", "image.arm": "registry.lan/x:1 (built)",
            "image.amd64.emulated": "false", "data_version": "d1"}
    assert images_of(tags) == {"amd64": GOOD, "arm64": tags["image.arm64"]}


class FakeService:
    """The service container's contract: ``update`` raises RolloutFailed, or switches and says so."""

    def __init__(self, failure: str | None = None, serves: bool = True) -> None:
        self.failure, self.serves, self.calls, self.confirmed = failure, serves, [], []

    def update(self, image: str, version: str) -> bool:
        self.calls.append((image, version))
        if self.failure:
            raise RolloutFailed(self.failure, f"the new container failed ({self.failure})")
        return True

    def confirm(self, version: str) -> None:
        self.confirmed.append(version)
        if not self.serves:
            raise RolloutFailed("image_health", f"the running container does not serve {version}")


@pytest.fixture(scope="module")
def bundles(bundle_kit) -> dict[str, Path]:
    return {version: bundle_kit.bundle(version, name=f"images-{version}.tar.gz") for version in ("v1", "v2")}


def _handler(tmp_path, bundle_kit, service, published) -> tuple[RolloutHandler, ModelStore]:
    store = ModelStore(tmp_path / "store", bundle_kit.trusted_keys())
    handler = RolloutHandler("device-1", "lab", store, bundle_kit.trusted_keys(),
                             lambda topic, payload, retain: published.append(json.loads(payload)),
                             service=service, arch="amd64")
    return handler, store


@pytest.mark.parametrize("reason", ["image_pull", "image_start", "image_not_ready", "image_health"])
def test_a_refused_image_is_reported_and_the_store_goes_back(tmp_path, bundle_kit, bundles, reason) -> None:
    published: list[dict] = []
    handler, store = _handler(tmp_path, bundle_kit, FakeService(), published)
    handler.handle(sign_rollout(manifest(bundles["v1"], "v1", 1, images={"amd64": GOOD}), bundle_kit.private_key))
    assert published[-1]["state"] == "installed" and store.state().active == "v1"
    handler.service = service = FakeService(reason)
    status = handler.handle(sign_rollout(manifest(bundles["v2"], "v2", 2, images={"amd64": GOOD}),
                                         bundle_kit.private_key))
    assert status is not None and (status["state"], status["reason"], status["version"]) == ("failed", reason, "v1")
    assert store.state().active == "v1" and service.calls == [(GOOD, "v2")]  # the old container's model stays


def test_a_model_only_rollout_and_a_device_without_containers_never_touch_images(tmp_path, bundle_kit,
                                                                                  bundles) -> None:
    published: list[dict] = []
    service = FakeService("image_start")
    handler, store = _handler(tmp_path, bundle_kit, service, published)
    arm_only = {"arm64": GOOD}  # nothing for this device's architecture: the model alone
    handler.handle(sign_rollout(manifest(bundles["v1"], "v1", 1, images=arm_only), bundle_kit.private_key))
    assert published[-1]["state"] == "installed" and service.calls == []
    assert service.confirmed == ["v1"]  # installed once the running container serves it, not before
    handler.service = None  # a device that runs the service itself
    handler.handle(sign_rollout(manifest(bundles["v2"], "v2", 2, images={"amd64": GOOD}), bundle_kit.private_key))
    assert published[-1]["state"] == "installed" and store.state().active == "v2"


def test_a_model_only_change_the_running_container_does_not_serve_is_a_failure(tmp_path, bundle_kit,
                                                                               bundles) -> None:
    published: list[dict] = []
    handler, store = _handler(tmp_path, bundle_kit, FakeService(serves=False), published)
    store.install(bundles["v1"])
    handler.handle(sign_rollout(manifest(bundles["v2"], "v2", 1), bundle_kit.private_key))
    assert (published[-1]["state"], published[-1]["reason"]) == ("failed", "image_health")
    assert store.state().active == "v1"  # the store back on what the container serves


def test_a_container_device_needs_its_first_image_pinned(tmp_path) -> None:
    base = ["--broker", "b:1883", "--device", "d1", "--group", "lab", "--store", str(tmp_path),
            "--public-keys", str(tmp_path), "--password-file", str(tmp_path / "pw")]
    with pytest.raises(Exception, match="--service-image"):
        load_config([*base, "--engine", "unix:///var/run/docker.sock"], environ={})
    with pytest.raises(Exception, match="not pinned by digest"):
        load_config([*base, "--engine", "unix:///var/run/docker.sock", "--service-image", "edge:latest"], environ={})
    with pytest.raises(Exception, match="engine"):
        load_config([*base, "--engine", "tcp://10.0.0.1:2375", "--service-image", GOOD], environ={})
    config = load_config([*base, "--engine", "unix:///var/run/docker.sock", "--service-image", GOOD,
                          "--arch", "arm64"], environ={})
    assert (config.service_image, config.arch, config.service_listen) == (GOOD, "arm64", "0.0.0.0:8080")


ROWS = [{"class_index": 3}, {"class_index": 7}]


@pytest.mark.parametrize(("answer", "problem"), [
    ({"version": "v2", "fallback": None, "predictions": ROWS}, ""),
    ({"version": "v1", "fallback": None, "predictions": ROWS}, "serves v1"),
    ({"version": "v2", "fallback": "large model failed", "predictions": ROWS}, "fallback"),
    ({"version": "v2", "fallback": None, "predictions": ROWS[:1]}, "1 predictions for a sample of 2"),
    ({"version": "v2", "fallback": None, "predictions": [{"class_index": 3}, {"class_index": 1}]}, "agree 50%"),
    ({"version": "v2", "predictions": "nonsense"}, "unexpected document"),
])
def test_the_health_check_names_what_is_wrong(answer, problem) -> None:
    found = _health_problem(answer, "v2", [3, 7], 0.9)
    assert (found == "") if not problem else (problem in found), found
