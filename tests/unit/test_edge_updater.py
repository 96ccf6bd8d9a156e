"""The device updater without a broker: real signed bundles and a real store, a list standing in for MQTT."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from prometheus_client import generate_latest

from edge.errors import ConfigError, StoreError
from edge.files import sha256_file
from edge.rollout import RolloutManifest, cohort_position, sign_rollout
from edge.serving.metrics import Metrics
from edge.store.model_store import ModelStore
from edge.updater.apply import DOWNLOAD_PREFIX, RolloutHandler
from edge.updater.daemon import load_config, main
from edge.updater.fetch import RolloutFailed, fetch_bundle
from edge.updater.state import STATE_FILE, hold_lock, load_state
from edge.updater.telemetry import bucket_quantile, parse_metrics, summarize

DEVICE, GROUP = "device-1", "lab"
STATUS_TOPIC = f"fleet/{GROUP}/status/{DEVICE}"


class Published(list):
    """The fake broker: every (topic, decoded JSON, retain) the handler published."""

    def __call__(self, topic: str, payload: bytes, retain: bool) -> None:
        self.append((topic, json.loads(payload), retain))


@pytest.fixture(scope="module")
def bundles(bundle_kit) -> dict[str, Path]:
    """v1..v3 built once: a rebuilt version would differ in bytes and be refused as a version conflict."""
    return {version: bundle_kit.bundle(version, name=f"updater-{version}.tar.gz") for version in ("v1", "v2", "v3")}


@pytest.fixture
def published() -> Published:
    return Published()


@pytest.fixture
def store(tmp_path, bundle_kit) -> ModelStore:
    return ModelStore(tmp_path / "store", bundle_kit.trusted_keys())


@pytest.fixture
def handler(store, bundle_kit, published) -> RolloutHandler:
    return RolloutHandler(DEVICE, GROUP, store, bundle_kit.trusted_keys(), published, clock=lambda: 1234.5)


def rollout(bundle: Path, version: str, sequence: int, action: str = "install", **changes) -> RolloutManifest:
    fields = {"rollout_id": "r1", "group": GROUP, "sequence": sequence, "action": action,
              "model_name": "edgeloop-digits", "version": version, "bundle_url": bundle.as_uri(),
              "bundle_sha256": sha256_file(bundle), "cohort_cutoff": 1.0, "issued_at": 1.0,
              "reason": "canary unhealthy" if action == "rollback" else ""}
    return RolloutManifest(**{**fields, **changes})


def test_a_signed_manifest_is_installed_and_acknowledged(handler, store, bundles, bundle_kit, published):
    status = handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 1), bundle_kit.private_key))
    expected = {"device": DEVICE, "group": GROUP, "rollout_id": "r1", "sequence": 1, "state": "installed",
                "version": "v1", "target": "v1", "reason": "", "at": 1234.5, "variant": "tflite_int8",
                "device_class": None}
    assert status == expected and published == [(STATUS_TOPIC, expected, True)]
    assert store.state().active == "v1" and store.problems() == []
    assert json.loads((store.root / STATE_FILE).read_text())["last_sequence"] == 1
    assert not list(store.root.glob(f"{DOWNLOAD_PREFIX}*"))  # the download is gone once installed


def _unsigned(payload: bytes, key) -> bytes:
    envelope = json.loads(payload)
    envelope.pop("signature")
    return json.dumps(envelope).encode()


def _tampered(payload: bytes, key) -> bytes:  # the signed text altered afterwards
    envelope = json.loads(payload)
    envelope["manifest"] = envelope["manifest"].replace('"version":"v1"', '"version":"v9"')
    return json.dumps(envelope).encode()


def _unknown_key(payload: bytes, key) -> bytes:
    return sign_rollout(RolloutManifest.from_json(json.loads(payload)["manifest"]),
                        Ed25519PrivateKey.generate())


def _garbage(payload: bytes, key) -> bytes:
    return b"\xff not json"


@pytest.mark.parametrize("spoil, reason", [(_unsigned, "unsigned"), (_tampered, "bad_signature"),
                                           (_unknown_key, "unknown_key"), (_garbage, "malformed")])
def test_an_unverifiable_manifest_is_refused_and_nothing_installed(handler, store, bundles, bundle_kit, published,
                                                                   spoil, reason):
    payload = sign_rollout(rollout(bundles["v1"], "v1", 1), bundle_kit.private_key)
    status = handler.handle(spoil(payload, bundle_kit.private_key))
    assert status["state"] == "refused" and status["reason"] == reason
    assert status["rollout_id"] is None and status["sequence"] is None  # nothing in it can be trusted
    assert published[-1][0] == STATUS_TOPIC
    assert store.state().installed == [] and handler.state.last_sequence == 0


def test_a_manifest_signed_for_another_group_is_refused(handler, store, bundles, bundle_kit):
    status = handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 1, group="other"), bundle_kit.private_key))
    assert (status["state"], status["reason"]) == ("refused", "wrong_group")
    assert store.state().installed == [] and handler.state.last_sequence == 0


def test_a_replayed_older_sequence_is_ignored(handler, store, bundles, bundle_kit, published):
    first = sign_rollout(rollout(bundles["v1"], "v1", 1), bundle_kit.private_key)
    handler.handle(first)
    handler.handle(sign_rollout(rollout(bundles["v2"], "v2", 2), bundle_kit.private_key))
    reported = len(published)
    assert handler.handle(first) is None  # a replay of the v1 manifest
    assert len(published) == reported and store.state().active == "v2" and handler.state.last_sequence == 2


def test_an_older_version_is_refused_as_install_and_applied_as_signed_rollback(handler, store, bundles, bundle_kit):
    handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 1), bundle_kit.private_key))
    handler.handle(sign_rollout(rollout(bundles["v2"], "v2", 2), bundle_kit.private_key))
    status = handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 3), bundle_kit.private_key))
    assert (status["state"], status["reason"], status["version"]) == ("refused", "downgrade", "v2")
    assert store.state().active == "v2" and handler.state.last_sequence == 3

    status = handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 4, action="rollback"), bundle_kit.private_key))
    assert (status["state"], status["version"], status["target"]) == ("installed", "v1", "v1")
    state = store.state()
    assert state.active == "v1" and "canary unhealthy" in state.rolled_back["v2"]  # the store's rollback, with why


def test_a_rollback_to_a_version_not_installed_fetches_it(handler, store, bundles, bundle_kit):
    store.install(bundles["v2"])
    status = handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 1, action="rollback"), bundle_kit.private_key))
    assert status["state"] == "installed" and store.state().active == "v1"


def test_the_active_version_is_acknowledged_again(handler, store, bundles, bundle_kit):
    handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 1), bundle_kit.private_key))
    status = handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 2, rollout_id="r2"), bundle_kit.private_key))
    assert (status["state"], status["reason"], status["rollout_id"]) == ("installed", "already_active", "r2")


def _wrong_digest(manifest: RolloutManifest, bundles, tmp_path) -> RolloutManifest:
    return manifest.replace(bundle_sha256="0" * 64)


def _not_a_bundle(manifest: RolloutManifest, bundles, tmp_path) -> RolloutManifest:
    junk = tmp_path / "junk.tar.gz"
    junk.write_bytes(b"\x1f\x8b not really gzip")
    return manifest.replace(bundle_url=junk.as_uri(), bundle_sha256=sha256_file(junk))


def _other_version(manifest: RolloutManifest, bundles, tmp_path) -> RolloutManifest:
    other = bundles["v3"]  # signed and intact, but another version than the rollout names
    return manifest.replace(bundle_url=other.as_uri(), bundle_sha256=sha256_file(other))


def _missing(manifest: RolloutManifest, bundles, tmp_path) -> RolloutManifest:
    return manifest.replace(bundle_url=(tmp_path / "nowhere.tar.gz").as_uri())


@pytest.mark.parametrize("spoil, reason", [(_wrong_digest, "digest_mismatch"), (_not_a_bundle, "truncated"),
                                           (_other_version, "version_mismatch"), (_missing, "fetch_failed")])
def test_a_failed_attempt_keeps_the_previous_version_and_reports_why(handler, store, bundles, bundle_kit, tmp_path,
                                                                     spoil, reason):
    handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 1), bundle_kit.private_key))
    manifest = spoil(rollout(bundles["v2"], "v2", 2), bundles, tmp_path)
    status = handler.handle(sign_rollout(manifest, bundle_kit.private_key))
    assert (status["state"], status["reason"], status["version"], status["target"]) == ("failed", reason, "v1", "v2")
    assert store.state().active == "v1" and store.problems() == []
    assert handler.state.last_sequence == 2  # the outcome is known: not retried until a new manifest
    assert not list(store.root.glob(f"{DOWNLOAD_PREFIX}*"))


def test_a_device_outside_the_cohort_does_nothing(handler, store, bundles, bundle_kit, published):
    cutoff = cohort_position("r1", DEVICE) / 2  # below this device's position: not in the cohort
    assert handler.handle(sign_rollout(rollout(bundles["v1"], "v1", 1, cohort_cutoff=cutoff),
                                       bundle_kit.private_key)) is None
    assert published == [] and store.state().installed == [] and handler.state.last_sequence == 0


def test_the_state_survives_a_restart(handler, store, bundles, bundle_kit, published):
    payload = sign_rollout(rollout(bundles["v1"], "v1", 1), bundle_kit.private_key)
    status = handler.handle(payload)
    (store.root / f"{DOWNLOAD_PREFIX}left-by-a-kill.tar.gz").write_bytes(b"partial")
    restarted = RolloutHandler(DEVICE, GROUP, ModelStore(store.root, bundle_kit.trusted_keys()),
                               bundle_kit.trusted_keys(), published)
    assert restarted.state.last_sequence == 1 and restarted.last_status() == status
    assert not list(store.root.glob(f"{DOWNLOAD_PREFIX}*"))  # a killed download is cleaned up
    assert restarted.handle(payload) is None  # the retained manifest arriving again after the restart
    assert load_state(store.root / STATE_FILE, "another-group").last_sequence == 0  # sequences are per group


def test_a_damaged_state_file_is_a_clear_error(store, bundle_kit, published):
    (store.root / STATE_FILE).write_text("{not json")
    with pytest.raises(StoreError, match="delete it"):
        RolloutHandler(DEVICE, GROUP, store, bundle_kit.trusted_keys(), published)


def test_one_updater_per_store(tmp_path):
    held = hold_lock(tmp_path)
    try:
        with pytest.raises(ConfigError, match="another updater"):
            hold_lock(tmp_path)
    finally:
        held.close()


# ---- fetching over HTTP ---------------------------------------------------------------------------

class FlakyBundleServer(BaseHTTPRequestHandler):
    """Answers 503 to the first ``failures`` requests, then serves ``content``; 404 off ``/bundle``."""

    failures, content, requests = 0, b"", 0

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).requests += 1
        if self.path != "/bundle":
            self.send_error(404)
            return
        if type(self).requests <= type(self).failures:
            self.send_error(503)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.content)))
        self.end_headers()
        self.wfile.write(self.content)

    def log_message(self, *args) -> None:
        """Quiet: the test's output is its assertions, not the server's access log."""


@pytest.fixture
def bundle_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyBundleServer)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FlakyBundleServer.requests = 0
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", FlakyBundleServer
    finally:
        server.shutdown()
        server.server_close()


def test_http_fetch_retries_with_backoff_then_verifies(tmp_path, bundle_server, bundles):
    url, served = bundle_server
    served.failures, served.content = 2, bundles["v1"].read_bytes()
    waits: list[float] = []
    digest = fetch_bundle(f"{url}/bundle", tmp_path / "b.tar.gz", 2**30, timeout_s=5, attempts=4,
                          initial_backoff_s=1.0, sleep=waits.append)
    assert digest == sha256_file(bundles["v1"]) == sha256_file(tmp_path / "b.tar.gz")
    assert served.requests == 3 and len(waits) == 2
    assert 0 <= waits[0] <= 1.0 and 0 <= waits[1] <= 2.0  # full jitter under a doubling cap


def test_http_fetch_fails_at_once_on_a_permanent_answer_and_caps_size(tmp_path, bundle_server):
    url, served = bundle_server
    with pytest.raises(RolloutFailed) as failed:
        fetch_bundle(f"{url}/missing", tmp_path / "b", 2**20, attempts=4, sleep=lambda s: None)
    assert failed.value.reason == "fetch_failed" and "404" in str(failed.value) and served.requests == 1
    served.failures, served.content = 0, b"x" * 4096
    with pytest.raises(RolloutFailed) as failed:
        fetch_bundle(f"{url}/bundle", tmp_path / "b", 1024, sleep=lambda s: None)
    assert failed.value.reason == "too_large"


# ---- telemetry ------------------------------------------------------------------------------------

def test_telemetry_is_the_change_between_two_scrapes():
    metrics = Metrics()  # the service's own registry: names cannot drift from what it exports
    metrics.model_info.info({"version": "v2"})
    metrics.latency.labels("v1", "primary").observe(0.5)  # before the window: must not count
    metrics.confidence.labels("v1").observe(0.1)
    before = parse_metrics(generate_latest(metrics.registry).decode(), at=100.0)
    for seconds in [0.0012] * 18 + [0.03, 0.03]:  # 20 requests: 18 in (0.001, 0.0025], 2 in (0.025, 0.05]
        metrics.latency.labels("v2", "primary").observe(seconds)
    metrics.latency.labels("v2", "large").observe(2.0)  # the cascade's second stage: not a request
    for confidence in (0.9, 0.7):
        metrics.confidence.labels("v2").observe(confidence)
    metrics.rejected.labels("shape").inc(3)
    metrics.unavailable.inc()
    after = parse_metrics(generate_latest(metrics.registry).decode(), at=130.0)
    summary = summarize(before, after)
    assert summary["version"] == "v2" and summary["window_s"] == 30.0
    assert (summary["requests"], summary["errors"]) == (24, 4) and summary["error_rate"] == pytest.approx(4 / 24)
    assert 1.0 < summary["p50_ms"] <= 2.5 and 25.0 < summary["p95_ms"] <= 50.0
    assert summary["mean_confidence"] == pytest.approx(0.8)


def test_telemetry_after_a_service_restart_counts_from_zero():
    busy, fresh = Metrics(), Metrics()
    for _ in range(10):
        busy.latency.labels("v1", "primary").observe(0.001)
    fresh.latency.labels("v1", "primary").observe(0.001)
    summary = summarize(parse_metrics(generate_latest(busy.registry).decode(), 0.0),
                        parse_metrics(generate_latest(fresh.registry).decode(), 30.0))
    assert summary["requests"] == 1 and summary["mean_confidence"] is None


@pytest.mark.parametrize("quantile, buckets, expected", [
    (0.5, {}, None),
    (0.5, {1.0: 0.0, float("inf"): 0.0}, None),
    (0.5, {1.0: 10.0, 2.0: 10.0, float("inf"): 10.0}, 0.5),  # interpolated inside the first bucket, from 0
    (0.5, {1.0: 0.0, 3.0: 10.0, float("inf"): 10.0}, 2.0),
    (0.95, {1.0: 5.0, float("inf"): 10.0}, 1.0),  # in +Inf: the last finite bound
])
def test_bucket_quantile(quantile, buckets, expected):
    assert bucket_quantile(quantile, buckets) == expected


# ---- configuration --------------------------------------------------------------------------------

def test_settings_come_from_flags_and_environment(tmp_path):
    config = load_config(["--broker", "broker.local", "--device", "d-1", "--public-keys", "a.pub", "b.pub"],
                         environ={"EDGELOOP_GROUP": "lab", "EDGELOOP_STORE": str(tmp_path),
                                  "EDGELOOP_TELEMETRY_INTERVAL_S": "5"})
    assert (config.device_id, config.group, config.telemetry_interval_s) == ("d-1", "lab", 5.0)
    assert config.host_port == ("broker.local", 1883) and config.public_keys == [Path("a.pub"), Path("b.pub")]


@pytest.mark.parametrize("change, message", [
    ({"--group": "a/b"}, "--group (EDGELOOP_GROUP)"),
    ({"--broker": "host:port"}, "--broker"),
    ({"--broker": "host:99999"}, "not in 1..65535"),
    ({"--telemetry-interval-s": "0"}, "--telemetry-interval-s"),
    ({"--password-file": "/nonexistent/password"}, "--password-file"),
    ({"--tls-ca": "/nonexistent/ca.pem"}, "--tls-ca"),
    ({"--tls-ca": "password"}, "not a usable CA certificate"),  # a file, but not a certificate
])
def test_a_bad_setting_exits_2_naming_it(tmp_path, bundle_kit, capsys, monkeypatch, change, message):
    monkeypatch.delenv("EDGELOOP_MQTT_PASSWORD", raising=False)
    monkeypatch.chdir(tmp_path)  # relative paths in the table are files here
    password = tmp_path / "password"
    password.write_text("secret\n")
    flags = {"--broker": "127.0.0.1:1", "--device": "d-1", "--group": "lab", "--password-file": str(password),
             "--store": str(tmp_path / "store"), "--public-keys": str(bundle_kit.public_dir), **change}
    assert main([part for pair in flags.items() for part in pair]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and message in error
