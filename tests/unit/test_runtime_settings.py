"""A class's bundle runs in the configuration the benchmark measured best on it (``runtime_options``): LiteRT
without XNNPACK, an ONNX Runtime provider list. The device loads, health-checks and serves it that way, says so on
``/v1/model``, and a bundle without options is byte-for-byte what older devices already take."""

from __future__ import annotations

import json
import tarfile

import pytest
from starlette.testclient import TestClient

from edge.errors import BundleRefused
from edge.signing import load_public_keys
from edge.store.manifest import MANIFEST_FILE, parse_manifest
from edge.store.model_store import ModelStore

NO_XNNPACK = {"config": "no-xnnpack", "xnnpack": False}


def _manifest(bundle) -> dict:
    with tarfile.open(bundle) as archive:
        return json.loads(archive.extractfile(MANIFEST_FILE).read())


def _store(tmp_path, bundle_kit, *bundles) -> ModelStore:
    store = ModelStore(tmp_path / "store", load_public_keys([bundle_kit.public_dir]))
    for bundle in bundles:
        store.install(bundle)
    return store


def test_a_bundle_without_options_is_what_older_devices_take_and_one_with_them_is_signed_with_them(bundle_kit):
    plain = _manifest(bundle_kit.bundle("v1", name="plain.tar.gz"))
    assert "runtime_options" not in plain  # an older device's schema refuses unknown fields
    chosen = _manifest(bundle_kit.bundle("v1", name="chosen.tar.gz", options=NO_XNNPACK))
    assert chosen["runtime_options"] == {"config": "no-xnnpack", "xnnpack": False,
                                         "onnx_providers": ["CPUExecutionProvider"]}
    assert parse_manifest(json.dumps(chosen).encode()).runtime_options.xnnpack is False


def test_the_device_loads_and_serves_the_version_in_its_bundles_configuration(tmp_path, bundle_kit):
    store = _store(tmp_path, bundle_kit, bundle_kit.bundle("v1", name="v1-default.tar.gz"),
                   bundle_kit.bundle("v2", name="v2-no-xnnpack.tar.gz", options=NO_XNNPACK))
    assert store.load("v1").primary.accelerators == ["XNNPACK"]
    assert store.load("v2").primary.accelerators == []  # the measured configuration, not the runtime's default
    from edge.config import ServeConfig
    from edge.serving.app import create_app

    config = ServeConfig(store=store.root, public_keys=[bundle_kit.public_dir], samples_dir=tmp_path / "samples",
                         upload_to=str(tmp_path / "outbox"), device_id="settings-test")
    with TestClient(create_app(config)) as client:
        status = client.get("/v1/model").json()
        assert (status["serving"], status["config"], status["accelerators"]) == ("v2", "no-xnnpack", [])
        answer = client.post("/v1/predict", json={"inputs": bundle_kit.sample[:2].tolist()})
        assert answer.status_code == 200 and answer.json()["version"] == "v2", answer.text


def test_a_provider_this_build_lacks_falls_back_to_the_cpu_and_the_version_still_installs(tmp_path, bundle_kit):
    """The Jetson's bundle asks for CUDA; on a CPU-only ONNX Runtime build it runs on the CPU provider."""
    import onnxruntime

    options = {"config": "CUDAExecutionProvider", "onnx_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    store = _store(tmp_path, bundle_kit, bundle_kit.bundle("v1", primary="onnx_int8", name="cuda.tar.gz",
                                                           options=options))
    loaded = store.load("v1")
    expected = [] if "CUDAExecutionProvider" not in onnxruntime.get_available_providers() else ["CUDAExecutionProvider"]
    assert loaded.primary.accelerators == expected
    assert loaded.manifest.runtime_options.config == "CUDAExecutionProvider"


@pytest.mark.parametrize("options, problem", [
    ({"config": "x", "onnx_providers": ["rm -rf /"]}, "execution provider name"),
    ({"config": "x", "onnx_providers": []}, "at least 1"),
    ({"config": "../x", "xnnpack": False}, "config"),
    ({"config": "x", "xnnpack": "sometimes"}, "xnnpack"),
    ({"config": "x", "threads": 64}, "threads"),
])
def test_malformed_runtime_options_are_a_malformed_bundle(bundle_kit, options, problem):
    manifest = _manifest(bundle_kit.bundle("v1", name="base.tar.gz"))
    manifest["runtime_options"] = options
    with pytest.raises(BundleRefused, match=problem) as refused:
        parse_manifest(json.dumps(manifest).encode())
    assert refused.value.reason == "malformed"
