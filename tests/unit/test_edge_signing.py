"""Signature and manifest parsing refuse every malformed record with :class:`BundleRefused`, never another error.

Property tests (hypothesis): a valid ``manifest.sig`` and a valid ``manifest.json`` from a real signed bundle
are mutated in many ways (a value of another type at any depth, fields dropped or added, the whole record
replaced, deep nesting, non-UTF-8, truncation, huge files); each outcome must be a refusal, or, where the
mutation happened to leave the record valid, a valid answer (the same signer; a manifest).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge.errors import BundleRefused
from edge.signing import MAX_SIGNATURE_BYTES, sign_manifest, verify_manifest
from edge.store.bundle import verify_folder
from edge.store.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURE_FILE, Manifest, parse_manifest
from tests.edge_helpers import read_members

EXAMPLES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
                    derandomize=True)  # the same cases on every run and machine

JSON_SCALARS = (st.none() | st.booleans() | st.integers() | st.integers(min_value=10**30, max_value=10**400)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=12), children, max_size=4), max_leaves=12)


@pytest.fixture(scope="module")
def signed(bundle_kit) -> dict[str, bytes]:
    """The members of a real signed bundle."""
    return read_members(bundle_kit.bundle("v1", name="fuzz-v1.tar.gz"))


def _dumps(value: Any) -> bytes:
    """JSON text the way a hostile writer may emit it: NaN and Infinity included, huge integers whole."""
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def mutated(draw, original: Any) -> Any:
    """``original`` (a JSON tree) with one thing changed somewhere in it."""
    if isinstance(original, (dict, list)) and original and draw(st.booleans()):
        keys = sorted(original) if isinstance(original, dict) else list(range(len(original)))
        key = draw(st.sampled_from(keys))
        copy = dict(original) if isinstance(original, dict) else list(original)
        copy[key] = draw(mutated(original[key]))
        return copy
    operation = draw(st.sampled_from(["replace", "drop", "add", "wrap"]))
    if operation == "drop" and isinstance(original, dict) and original:
        key = draw(st.sampled_from(sorted(original)))
        return {name: value for name, value in original.items() if name != key}
    if operation == "add" and isinstance(original, dict):
        return {**original, draw(st.text(min_size=1, max_size=12)): draw(JSON_VALUES)}
    if operation == "wrap":
        return draw(st.sampled_from([[original], {"record": original}, [original, original]]))
    return draw(JSON_VALUES)


@st.composite
def hostile_bytes(draw, valid: bytes, limit: int) -> bytes:
    """Bytes no JSON tree gives: cut, not UTF-8, nested deeper than any parser recurses, over the size limit."""
    kind = draw(st.sampled_from(["cut", "binary", "not_utf8", "nested", "huge", "nan"]))
    if kind == "cut":
        return valid[:draw(st.integers(0, len(valid) - 1))]
    if kind == "binary":
        return draw(st.binary(max_size=200))
    if kind == "not_utf8":
        at = draw(st.integers(0, len(valid)))
        return valid[:at] + draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"])) + valid[at:]
    if kind == "nested":
        depth = draw(st.sampled_from([1_000, 10_000, 100_000]))
        return draw(st.sampled_from([b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth]))
    if kind == "huge":
        return valid[:-2] + b', "pad": "' + b"x" * limit + b'"}'
    return valid.replace(b'"', b"", 2) if draw(st.booleans()) else b'{"key_id": NaN, "algorithm": Infinity}'


def _refused_or(call, accept) -> str:
    """Run ``call``: "refused" on :class:`BundleRefused` (with a reason), else "accepted" once ``accept`` holds
    for its result. Any other exception fails the test."""
    try:
        result = call()
    except BundleRefused as refusal:
        assert refusal.reason and str(refusal), refusal
        return "refused"
    assert accept(result), result
    return "accepted"


@EXAMPLES
@given(data=st.data())
def test_a_mutated_signature_record_is_always_a_refusal(signed, bundle_kit, data):
    keys, manifest = bundle_kit.trusted_keys(), signed[MANIFEST_FILE]
    valid = signed[SIGNATURE_FILE]
    signer = verify_manifest(manifest, valid, keys)
    record = json.loads(valid)
    content = data.draw(st.one_of(mutated(record).map(_dumps), hostile_bytes(valid, MAX_SIGNATURE_BYTES)))
    _refused_or(lambda: verify_manifest(manifest, content, keys), lambda result: result == signer)


@EXAMPLES
@given(data=st.data())
def test_a_mutated_manifest_is_always_a_refusal(signed, data):
    valid = signed[MANIFEST_FILE]
    content = data.draw(st.one_of(mutated(json.loads(valid)).map(_dumps), hostile_bytes(valid, MAX_MANIFEST_BYTES)))
    _refused_or(lambda: parse_manifest(content), lambda result: isinstance(result, Manifest))


@settings(EXAMPLES, max_examples=120)
@given(data=st.data())
def test_a_mutated_manifest_signed_by_a_trusted_key_is_still_refused(signed, bundle_kit, data):
    """The signature is right, so parsing and the payload checks are what must refuse it."""
    keys, valid = bundle_kit.trusted_keys(), signed[MANIFEST_FILE]
    content = data.draw(mutated(json.loads(valid)).map(_dumps))
    with tempfile.TemporaryDirectory() as folder:
        for name, payload in signed.items():
            (Path(folder) / name).write_bytes(payload)
        (Path(folder) / MANIFEST_FILE).write_bytes(content)
        (Path(folder) / SIGNATURE_FILE).write_bytes(sign_manifest(content, bundle_kit.private_key))
        _refused_or(lambda: verify_folder(Path(folder), keys), lambda result: isinstance(result, Manifest))


@pytest.mark.parametrize("record", [
    {"algorithm": "ed25519", "key_id": ["abc"], "signature": "AAAA"},        # the 500: a list as key id
    {"algorithm": "ed25519", "key_id": {"id": "abc"}, "signature": "AAAA"},
    {"algorithm": ["ed25519"], "key_id": "abc", "signature": "AAAA"},
    {"algorithm": "ed25519", "key_id": "abc", "signature": 12},
    {"algorithm": "ed25519", "key_id": 12, "signature": "AAAA"},
    {"algorithm": "ed25519", "signature": "AAAA"},
    {"algorithm": "ed25519", "key_id": "abc", "signature": "AAAA", "extra": 1},
    ["ed25519", "abc", "AAAA"], "ed25519", 7, None,
], ids=["key-id-list", "key-id-object", "algorithm-list", "signature-int", "key-id-int", "key-id-missing",
        "unknown-field", "list", "string", "number", "null"])
def test_each_malformed_signature_record_is_an_unsigned_refusal(signed, bundle_kit, record):
    with pytest.raises(BundleRefused, match="manifest.sig") as caught:
        verify_manifest(signed[MANIFEST_FILE], json.dumps(record).encode(), bundle_kit.trusted_keys())
    assert caught.value.reason == "unsigned"


@pytest.mark.parametrize("content", [b"\xff\xfe", b"[" * 100_000 + b"]" * 100_000, b"x" * (MAX_SIGNATURE_BYTES + 1)],
                         ids=["not-utf8", "nested", "huge"])
def test_unreadable_signature_bytes_are_an_unsigned_refusal(signed, bundle_kit, content):
    with pytest.raises(BundleRefused) as caught:
        verify_manifest(signed[MANIFEST_FILE], content, bundle_kit.trusted_keys())
    assert caught.value.reason == "unsigned"


def test_a_huge_manifest_is_refused_unread(signed):
    with pytest.raises(BundleRefused, match="over") as caught:
        parse_manifest(signed[MANIFEST_FILE] + b" " * MAX_MANIFEST_BYTES)
    assert caught.value.reason == "malformed"


@pytest.mark.parametrize("payload", [
    b"[" * 30_000 + b"]" * 30_000,                                       # nested past Python's recursion limit
    b'{"manifest": "{}", "signature": ' + b"[" * 30_000 + b"]" * 30_000 + b"}",
    b'{"manifest": ["not", "a", "string"]}', b"\xff\xfe", b"{}", b"null",
], ids=["nested", "nested-signature", "manifest-list", "not-utf8", "empty-object", "null"])
def test_a_malformed_rollout_message_is_a_refusal_on_the_device(bundle_kit, payload):
    """What a device's updater reads from the broker: never anything but a refusal, whatever arrives."""
    from edge.rollout import MAX_MESSAGE_BYTES, verify_rollout

    assert len(payload) <= MAX_MESSAGE_BYTES  # under the size cap: the parser itself must hold
    with pytest.raises(BundleRefused) as refusal:
        verify_rollout(payload, bundle_kit.trusted_keys())
    assert refusal.value.reason == "malformed"
