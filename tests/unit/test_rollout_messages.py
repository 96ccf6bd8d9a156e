"""Every status and telemetry message from a device is untrusted: each hostile class is refused with its reason.

The valid messages are what the device side really publishes (``edge.updater.telemetry.summarize`` and the
status fields of ``edge.updater.apply``), so a schema that drifted from the devices would fail here too.
"""

from __future__ import annotations

import json
import math

import pytest
from prometheus_client import REGISTRY

from edge.updater.apply import json_bytes
from edge.updater.telemetry import Scrape, summarize
from tasks.rollout.messages import (
    INVALID_DEVICE,
    MAX_COUNT,
    MAX_MESSAGE_BYTES,
    DropCounts,
    MessageRefused,
    dropped_messages_counter,
    parse_device_message,
)

DEVICE = "sim-1"


def _summary() -> dict:
    """A real interval summary, as the updater computes it from two /metrics reads."""
    before = Scrape(0.0, served=10, errors=1, latency_buckets={0.005: 5, 0.01: 10, math.inf: 10},
                    confidence_sum=9.0, confidence_count=10, version="v2")
    after = Scrape(30.0, served=110, errors=3, latency_buckets={0.005: 55, 0.01: 108, math.inf: 110},
                   confidence_sum=99.0, confidence_count=110, version="v2")
    return {"device": DEVICE, "version": "v2", **{k: v for k, v in summarize(before, after).items() if k != "version"},
            "at": 1_780_000_000.5}


STATUS = {"device": DEVICE, "group": "lab", "rollout_id": "edgeloop-digits-v2-1a2b3c4d", "sequence": 7,
          "state": "installed", "version": "v2", "target": "v2", "reason": "already_active", "at": 1_780_000_000.25,
          "variant": "onnx_int8_u8s8", "device_class": "x86-gateway"}
REFUSED = {**STATUS, "rollout_id": None, "sequence": None, "state": "refused", "target": None, "reason": "unsigned",
           "variant": None, "device_class": None}


def _refused(kind: str, payload: bytes, device: str = DEVICE) -> str:
    with pytest.raises(MessageRefused) as caught:
        parse_device_message(kind, device, payload)
    return caught.value.reason


def test_what_devices_publish_is_accepted_as_is():
    summary = _summary()
    assert summary["requests"] == 102 and summary["errors"] == 2  # 100 answered + 2 refused
    assert parse_device_message("telemetry", DEVICE, json_bytes(summary)) == summary
    assert parse_device_message("status", DEVICE, json_bytes(STATUS)) == STATUS
    assert parse_device_message("status", DEVICE, json_bytes(REFUSED)) == REFUSED  # nothing trusted: nulls
    quiet = {**summary, "requests": 0, "errors": 0, "error_rate": 0.0, "p50_ms": None, "p95_ms": None,
             "mean_confidence": None, "version": None}
    assert parse_device_message("telemetry", DEVICE, json_bytes(quiet)) == quiet


def test_deep_nesting_is_a_parse_error_never_a_recursion_error():
    under_cap = b"[" * 4000 + b"]" * 4000  # fits the size cap, and is deep enough to kill json.loads
    assert len(under_cap) <= MAX_MESSAGE_BYTES
    with pytest.raises(RecursionError):
        json.loads(under_cap)  # what the channel used to do, on paho's network thread
    assert _refused("status", under_cap) == "not_json"
    assert _refused("telemetry", b'{"device": ' + b"[" * 4000 + b"]" * 4000 + b"}") == "not_json"
    assert _refused("status", b"[" * 100_000 + b"]" * 100_000) == "too_large"  # the document


def test_the_size_cap_is_checked_before_parsing():
    padded = json_bytes(STATUS)[:-1] + b" " * MAX_MESSAGE_BYTES + b"}"  # valid JSON, valid fields, too long
    assert _refused("status", padded) == "too_large"
    assert _refused("telemetry", b"x" * (MAX_MESSAGE_BYTES + 1)) == "too_large"
    assert _refused("telemetry", b"x" * 50_000_000) == "too_large"


@pytest.mark.parametrize("payload", [b"", b"not json", b"\xff\xfe\x00", b'{"device": "sim-1"', b"{'a': 1}",
                                     b'{"requests": NaN}', b'{"p95_ms": Infinity}', b'{"p95_ms": -Infinity}'])
def test_non_json_and_non_finite_literals_are_refused(payload):
    assert _refused("telemetry", payload) == "not_json"


@pytest.mark.parametrize("field, value", [
    ("requests", "5"), ("requests", True), ("requests", 5.0), ("requests", None), ("errors", [1]),
    ("p95_ms", "12"), ("mean_confidence", {"v": 1}), ("version", 12), ("device", None),
    ("requests", -1), ("errors", -3), ("requests", MAX_COUNT + 1), ("requests", 10**30),
    ("error_rate", 1.5), ("error_rate", -0.1), ("mean_confidence", 1.01), ("p95_ms", -1.0), ("p95_ms", 1e12),
    ("window_s", -5.0), ("at", -1.0), ("p95_ms", 1e400), ("version", "../v2"), ("version", "v" * 65),
])
def test_wrong_types_and_out_of_range_figures_are_refused(field, value):
    text = json.dumps({**_summary(), field: value}).encode()  # 1e400 is written as Infinity: not JSON
    assert _refused("telemetry", text) in ("invalid", "not_json", "device_mismatch")
    if not (isinstance(value, float) and math.isinf(value)) and field != "device":
        assert _refused("telemetry", text) == "invalid"


def test_finite_text_that_overflows_to_infinity_is_refused():
    text = json_bytes(_summary()).replace(b'"at":1780000000.5', b'"at":1e400')
    assert b"1e400" in text and _refused("telemetry", text) == "invalid"


def test_counts_must_add_up():
    assert _refused("telemetry", json_bytes({**_summary(), "errors": 103})) == "invalid"  # more errors than requests


@pytest.mark.parametrize("message", [{**STATUS, "state": "rolled_back"}, {**STATUS, "sequence": "7"},
                                     {**STATUS, "sequence": 0}, {**STATUS, "sequence": 2**60},
                                     {**STATUS, "reason": "<img src=x onerror=alert(1)>"},
                                     {**STATUS, "group": "lab/other"}, {**STATUS, "rollout_id": "a b"}])
def test_statuses_keep_to_the_updaters_fields_and_codes(message):
    assert _refused("status", json_bytes(message)) == "invalid"


@pytest.mark.parametrize("kind, message", [("telemetry", {**_summary(), "extra": 1}),
                                           ("status", {**STATUS, "figures": {"requests": 1}}),
                                           ("telemetry", {k: v for k, v in _summary().items() if k != "requests"}),
                                           ("status", [STATUS]), ("status", "installed"), ("telemetry", 5)])
def test_unknown_or_missing_fields_and_non_objects_are_refused(kind, message):
    assert _refused(kind, json.dumps(message).encode()) == "invalid"


def test_a_message_about_another_device_is_refused():
    assert _refused("telemetry", json_bytes({**_summary(), "device": "sim-2"})) == "device_mismatch"
    assert _refused("status", json_bytes({**STATUS, "device": ["sim-1"]})) == "device_mismatch"
    assert _refused("status", json_bytes({**STATUS, "device": "sim-1 "})) == "device_mismatch"


@pytest.mark.parametrize("device", ["site--a", "a/b", "+", "#", "", "-a", "a_", "x" * 65, "café", "a b"])
def test_a_topic_that_names_no_device_id_is_refused(device):
    message = json_bytes({**STATUS, "device": device})
    assert _refused("status", message, device=device) == "bad_device_id"


def test_drops_are_counted_per_device_and_reason_and_in_prometheus():
    def exported(device: str, reason: str) -> float:
        return REGISTRY.get_sample_value("edgeloop_rollout_dropped_messages_total",
                                         {"device": device, "reason": reason}) or 0.0

    before = exported("unit-dev-1", "not_json"), exported(INVALID_DEVICE, "bad_device_id")
    drops, other = DropCounts(), DropCounts()  # a second channel registers nothing new
    for _ in range(3):
        drops.add("unit-dev-1", "not_json", "not JSON", "fleet/lab/status/unit-dev-1")
    drops.add("unit-dev-1", "invalid", "not a status", "fleet/lab/status/unit-dev-1")
    drops.add("a/b", "bad_device_id", "no device id", "fleet/lab/status/a/b")
    other.add("unit-dev-1", "not_json", "not JSON", "fleet/lab/status/unit-dev-1")
    assert drops.as_dict() == {INVALID_DEVICE: {"bad_device_id": 1}, "unit-dev-1": {"not_json": 3, "invalid": 1}}
    assert other.as_dict() == {"unit-dev-1": {"not_json": 1}}
    assert exported("unit-dev-1", "not_json") - before[0] == 4
    assert exported(INVALID_DEVICE, "bad_device_id") - before[1] == 1
    assert dropped_messages_counter() is dropped_messages_counter()
