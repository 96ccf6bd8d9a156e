"""The edge inference service, run for real (uvicorn subprocess on loopback) against a signed model store."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge.runtime import EdgeModel
from edge.signing import load_public_keys
from edge.store.manifest import SIGNATURE_FILE
from edge.store.model_store import ModelStore
from tests.conftest import REPO_ROOT
from tests.edge_helpers import ADMIN_TOKEN, read_members, running_edge_server, write_members
from tests.stack_helpers import wait_for

OPENAPI_FILE = REPO_ROOT / "edge" / "serving" / "openapi.json"


def installed_store(root, bundle_kit, *bundles, activate_last: bool = True) -> ModelStore:
    store = ModelStore(root / "store", load_public_keys([bundle_kit.public_dir]))
    for index, bundle in enumerate(bundles):
        store.install(bundle, activate=activate_last or index < len(bundles) - 1)
    return store


@pytest.fixture(scope="module")
def server(tmp_path_factory, bundle_kit):
    root = tmp_path_factory.mktemp("edge_a")
    installed_store(root, bundle_kit, bundle_kit.bundle("v1"))
    with running_edge_server(root, bundle_kit.public_dir, sample_rate=1.0, sample_file_records=20,
                             max_request_bytes=64 * 1024, max_batch=64) as running:
        yield running


def test_json_and_npy_predictions_equal_the_runtime(server, bundle_kit, digits):
    batch = digits.x[:10]
    expected = EdgeModel.load(bundle_kit.model_files["tflite_int8"]).predict(batch)
    for npy in (False, True):
        response = server.predict(batch, npy=npy)
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["version"] == "v1" and body["variant"] == "tflite_int8" and body["fallback"] is None
        scores = np.array([row["scores"] for row in body["predictions"]], np.float32)
        assert np.array_equal(scores, expected)  # same runtime, same quantization both ways
        assert [row["class_index"] for row in body["predictions"]] == expected.argmax(1).tolist()
        assert [row["label"] for row in body["predictions"]] == [str(i) for i in expected.argmax(1)]
        assert np.allclose([row["confidence"] for row in body["predictions"]], expected.max(1))
    single = server.predict(batch[0]).json()  # one sample without the batch dimension
    assert len(single["predictions"]) == 1 and single["predictions"][0]["class_index"] == expected[0].argmax()


def npy_header_only(shape: tuple[int, ...]) -> bytes:
    """A .npy header declaring ``shape`` (float32) with no data after it."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"shape": shape, "fortran_order": False, "descr": "<f4"})
    return buffer.getvalue()


def _json(document) -> tuple[bytes, str]:
    return json.dumps(document).encode(), "application/json"


@pytest.mark.parametrize("body, content_type, status, error", [
    (b"{not json", "application/json", 400, "malformed_json"),
    (*_json([1, 2, 3]), 422, "no_inputs"),
    (*_json({"inputs": [[1, 2], [3]]}), 422, "ragged"),
    (*_json({"inputs": "abc"}), 422, "not_numeric"),
    (*_json({"inputs": [["a"] * 8] * 8}), 422, "not_numeric"),
    (*_json({"inputs": np.zeros((2, 8, 8, 3)).tolist()}), 422, "shape"),
    (*_json({"inputs": []}), 422, "empty"),
    (*_json({"inputs": np.zeros((65, 8, 8, 1)).tolist()}), 413, "batch_too_large"),
    (b'{"inputs": [[[NaN]]]}', "application/json", 400, "malformed_json"),  # NaN is not JSON
    (json.dumps({"inputs": np.full((8, 8, 1), 1e39).tolist()}).encode(), "application/json", 422, "not_finite"),
    (b"\x93NUMPY garbage", "application/x-npy", 400, "malformed_npy"),
    (npy_header_only((2**41,)), "application/x-npy", 400, "malformed_npy"),  # would allocate 8 TiB
    (npy_header_only((4, 8, 8, 1)), "application/x-npy", 400, "malformed_npy"),  # data cut off
    (b"x" * 70_000, "application/json", 413, "too_large"),
    (b"inputs=1", "application/x-www-form-urlencoded", 415, "media_type"),
])
def test_bad_requests_get_a_json_4xx_and_the_server_keeps_serving(server, digits, body, content_type, status, error):
    with server.client() as client:
        response = client.post("/v1/predict", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    assert response.json()["error"] == error and response.json()["detail"]
    assert server.predict(digits.x[:1]).status_code == 200


def test_nan_inside_a_well_shaped_batch_is_refused(server):
    batch = np.zeros((1, 8, 8, 1), np.float32)
    batch[0, 3, 3, 0] = np.nan
    response = server.predict(batch, npy=True)
    assert response.status_code == 422 and response.json()["error"] == "not_finite"
    assert server.metric("edgeloop_requests_rejected_total", reason="not_finite") >= 1


def test_health_readiness_model_status_and_metrics(server, digits):
    with server.client() as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.get("/readyz").json() == {"status": "ready", "version": "v1"}
        status = client.get("/v1/model").json()
    assert status["active"] == status["serving"] == "v1" and status["installed"] == ["v1"]
    assert status["manifest"]["version"] == "v1" and status["manifest"]["files"]
    server.predict(digits.x[:5])
    assert server.metric("edgeloop_ready") == 1.0
    assert server.metric("edgeloop_inference_latency_seconds_count", version="v1", stage="primary") >= 1
    assert server.metric("edgeloop_prediction_confidence_count", version="v1") >= 5
    assert server.metric("edgeloop_temperature_celsius") == 30.0
    assert server.metric("edgeloop_thermal_state") == 0.0
    assert server.metric("edgeloop_model_info", data_version="test-data", mlflow_version="1",
                         model_name="edgeloop-digits", runtime="tflite", variant="tflite_int8", version="v1") == 1.0


def test_admin_endpoints_need_the_bearer_token(server):
    refused_before = server.metric("edgeloop_store_refusals_total", reason="truncated")
    with server.client() as client:
        for path in ("/v1/model/reload", "/v1/model/rollback", "/v1/model/install"):
            assert client.post(path).status_code == 401
            assert client.post(path, headers={"authorization": "Bearer wrong"}).status_code == 401
    reloaded = server.admin("/v1/model/reload")
    assert reloaded.status_code == 200 and reloaded.json() == {"active": "v1"}
    refused = server.admin("/v1/model/rollback")
    assert refused.status_code == 409 and refused.json()["error"] == "no_previous"
    garbage = server.admin("/v1/model/install", content=b"not a bundle")
    assert garbage.status_code == 422 and garbage.json()["error"] == "truncated"
    assert server.metric("edgeloop_store_refusals_total", reason="truncated") == refused_before + 1


def test_a_malformed_signature_record_is_a_counted_refusal_not_a_server_error(server, bundle_kit, tmp_path):
    """A ``manifest.sig`` whose key id is a list once made ``/v1/model/install`` answer 500."""
    members = read_members(bundle_kit.bundle("v9", name="key-id-list.tar.gz"))
    record = json.loads(members[SIGNATURE_FILE])
    members[SIGNATURE_FILE] = json.dumps({**record, "key_id": [record["key_id"]]}).encode()
    bundle = write_members(tmp_path / "key-id-list.tar.gz", members)
    before = server.metric("edgeloop_store_refusals_total", reason="unsigned")
    with server.client() as client:
        active = client.get("/v1/model").json()["active"]
    answer = server.admin("/v1/model/install", content=bundle.read_bytes())
    assert answer.status_code == 422 and answer.json()["error"] == "unsigned", answer.text
    assert "manifest.sig is not a readable signature record" in answer.json()["detail"]
    assert server.metric("edgeloop_store_refusals_total", reason="unsigned") == before + 1
    with server.client() as client:
        assert client.get("/v1/model").json()["active"] == active  # still serving what it served


def test_the_running_service_never_loads_pydantic(server, digits):
    """The real process, after predictions, status and metrics: pydantic_core's extension (3.7 MB of resident
    memory, with pydantic 11 MB of the 64 MB budget) is not mapped into it."""
    from tasks.stack.processes import running_pid

    assert server.predict(digits.x[:3]).status_code == 200
    with server.client() as client:
        assert client.get("/v1/model").status_code == 200 and client.get("/metrics").status_code == 200
    pid = running_pid(server.run_dir, "edge-serve")
    assert b"edge.serving.serve" in Path(f"/proc/{pid}/cmdline").read_bytes()
    mapped = Path(f"/proc/{pid}/maps").read_text()
    assert "numpy" in mapped and "pydantic" not in mapped  # numpy: these are the service's own mappings


def test_sampled_features_reach_the_outbox_without_raw_inputs(server, digits):
    for start in range(0, 60, 10):
        assert server.predict(digits.x[start:start + 10]).status_code == 200
    uploaded = wait_for(lambda: sorted(server.outbox.glob("*.npz")), 30, "a closed sample file in the outbox")
    assert uploaded[0].name.startswith("test-device--")  # named as the ingest endpoint names a device's file
    with np.load(uploaded[0], allow_pickle=False) as archive:
        assert "x" not in archive.files  # private by default: derived features only
        assert archive["features"].shape[0] == len(archive["confidence"]) > 0
        assert set(archive["model_version"]) == {"v1"}


def test_the_openapi_document_is_served_and_describes_exactly_the_routes_the_app_serves(server, tmp_path, bundle_kit):
    with server.client() as client:
        served = client.get("/openapi.json").json()
    assert served == json.loads(OPENAPI_FILE.read_text())
    assert {"application/json", "application/x-npy"} <= set(
        served["paths"]["/v1/predict"]["post"]["requestBody"]["content"])
    from starlette.routing import Route

    from edge.config import ServeConfig
    from edge.serving.app import create_app

    config = ServeConfig(store=tmp_path / "store", public_keys=[bundle_kit.public_dir], samples_dir=tmp_path / "s")
    routes = {(method, route.path) for route in create_app(config).routes if isinstance(route, Route)
              for method in route.methods - {"HEAD"} if route.path != "/openapi.json"}
    documented = {(method.upper(), path) for path, operations in served["paths"].items() for method in operations}
    assert routes == documented, f"served but not documented: {sorted(routes - documented)}; documented but not " \
                                 f"served: {sorted(documented - routes)} (edge/serving/openapi.json is the contract)"


def test_fuzzing_the_api_from_its_openapi_document_finds_no_server_error(server, tmp_path, digits):
    schemathesis = [sys.executable, "-m", "schemathesis.cli", "run", f"{server.url}/openapi.json",
                    "--checks", "not_a_server_error,response_schema_conformance", "--max-examples", "40", "--seed", "1",
                    "--header", f"Authorization: Bearer {ADMIN_TOKEN}", "--exclude-path", "/v1/model/rollback",
                    "--phases", "examples,coverage,fuzzing", "--no-color", "--request-timeout", "30"]
    completed = subprocess.run(schemathesis, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-2000:]
    assert server.predict(digits.x[:1]).json()["version"] == "v1"  # still serving, same model


def test_an_empty_store_is_not_ready_and_says_so(tmp_path, bundle_kit, digits):
    with running_edge_server(tmp_path, bundle_kit.public_dir) as server:
        with server.client() as client:
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["error"] == "not_ready"
        response = server.predict(digits.x[:1])
        assert response.status_code == 503 and response.json()["error"] == "not_ready"
        installed = server.admin("/v1/model/install", content=bundle_kit.bundle("v7").read_bytes())
        assert installed.status_code == 200 and installed.json() == {"installed": "v7", "active": "v7"}
        assert server.predict(digits.x[:1]).json()["version"] == "v7"


def test_cascade_shadow_and_thermal_limits(tmp_path, bundle_kit, digits):
    installed_store(tmp_path, bundle_kit, bundle_kit.bundle("v2", primary="onnx_int8"),
                    bundle_kit.bundle("v1", large="tflite_fp32"))
    batch = digits.x[:32]
    with running_edge_server(tmp_path, bundle_kit.public_dir, cascade_threshold=1.0, shadow_version="v2",
                             shadow_fraction=1.0) as server:
        body = server.predict(batch).json()
        stages = [row["stage"] for row in body["predictions"]]
        assert "large" in stages  # threshold 1.0: every row not certain goes to the second stage
        large = EdgeModel.load(bundle_kit.model_files["tflite_fp32"]).predict(batch)
        escalated = [i for i, stage in enumerate(stages) if stage == "large"]
        assert np.allclose([body["predictions"][i]["scores"] for i in escalated], large[escalated], atol=1e-6)
        wait_for(lambda: server.metric("edgeloop_shadow_total", version="v2", outcome="agree") > 0, 20,
                 "shadow comparisons")
        assert server.metric("edgeloop_inference_latency_seconds_count", version="v2", stage="shadow") >= 1
        assert server.metric("edgeloop_inference_latency_seconds_count", version="v1", stage="large") >= 1

        server.sensor.write_text("80000\n")  # limit 85, soft margin 10: over the soft limit
        wait_for(lambda: server.metric("edgeloop_thermal_state") == 1.0, 10, "the soft thermal state")
        shadowed = server.metric("edgeloop_shadow_total", version="v2", outcome="agree")
        body = server.predict(batch).json()
        assert {row["stage"] for row in body["predictions"]} == {"primary"}
        assert server.metric("edgeloop_cascade_total", outcome="skipped_thermal") > 0
        assert server.metric("edgeloop_shadow_total", version="v2", outcome="skipped_thermal") >= 1
        assert server.metric("edgeloop_shadow_total", version="v2", outcome="agree") == shadowed

        server.sensor.write_text("84000\n")  # over the hard limit (85 - 2): uploads pause, predictions go on
        wait_for(lambda: server.metric("edgeloop_thermal_state") == 2.0, 10, "the hard thermal state")
        assert server.predict(batch[:1]).status_code == 200
        wait_for(lambda: server.metric("edgeloop_upload_paused") == 1.0, 20, "the uploader to pause")
        assert server.metric("edgeloop_upload_paused") == 1.0


def test_rollback_install_and_a_corrupt_active_version_after_restart(tmp_path, bundle_kit, digits):
    store = installed_store(tmp_path, bundle_kit, bundle_kit.bundle("v1"), bundle_kit.bundle("v2", primary="onnx_int8"))
    with running_edge_server(tmp_path, bundle_kit.public_dir) as server:
        assert server.predict(digits.x[:1]).json()["version"] == "v2"
        assert server.admin("/v1/model/rollback").json() == {"active": "v1"}
        assert server.predict(digits.x[:1]).json()["version"] == "v1"
        installed = server.admin("/v1/model/install", content=bundle_kit.bundle("v3").read_bytes())
        assert installed.json() == {"installed": "v3", "active": "v3"}
    model = next(store.version_dir("v3").glob("*.tflite"))  # disk corruption while the device was off
    model.chmod(0o644)
    model.write_bytes(model.read_bytes()[:-64])
    with running_edge_server(tmp_path, bundle_kit.public_dir) as server:
        wait_for(lambda: server.predict(digits.x[:1]).status_code == 200, 20, "a prediction")
        assert server.predict(digits.x[:1]).json()["version"] == "v1"  # v3 failed to load: rolled back
        status = server.client().get("/v1/model").json()
        assert status["active"] == "v1" and "v3" in status["rolled_back"]
        assert server.metric("edgeloop_fallbacks_total", reason="load_failed") >= 1


def test_a_watched_store_switch_is_picked_up_without_a_restart(tmp_path, bundle_kit, digits):
    store = installed_store(tmp_path, bundle_kit, bundle_kit.bundle("v1"))
    with running_edge_server(tmp_path, bundle_kit.public_dir) as server:
        assert server.predict(digits.x[:1]).json()["version"] == "v1"
        store.install(bundle_kit.bundle("v2", primary="onnx_int8"))  # as an updater on the device would
        wait_for(lambda: server.predict(digits.x[:1]).json()["version"] == "v2", 20, "the server to serve v2",
                 interval_s=0.1)
        store.state_file.write_text("{damaged")  # a broken pointer: keep serving what is loaded, say why
        with server.client() as client:
            status = client.get("/v1/model")
            assert status.status_code == 503 and status.json()["error"] == "store_error"
            assert "state.json is damaged" in status.json()["detail"]
            assert client.get("/readyz").status_code == 200
        assert server.predict(digits.x[:1]).json()["version"] == "v2"


def test_bad_settings_fail_fast_with_one_line(tmp_path, bundle_kit):
    completed = subprocess.run([sys.executable, "-m", "edge.serving.serve", "--public-keys", str(tmp_path / "nope.pub"),
                                "--store", str(tmp_path / "store")], capture_output=True, text=True, timeout=60,
                               cwd=REPO_ROOT)
    assert completed.returncode == 2 and "public key path" in completed.stderr and "Traceback" not in completed.stderr
    completed = subprocess.run([sys.executable, "-m", "edge.serving.serve", "--port", "70000", "--public-keys",
                                str(bundle_kit.public_dir)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert completed.returncode == 2 and "--port (EDGELOOP_PORT)" in completed.stderr
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    completed = subprocess.run([sys.executable, "-m", "edge.serving.serve", "--store", str(blocked / "store"),
                                "--public-keys", str(bundle_kit.public_dir)], capture_output=True, text=True,
                               timeout=60, cwd=REPO_ROOT)
    assert completed.returncode == 2 and "is not usable" in completed.stderr and "Traceback" not in completed.stderr
