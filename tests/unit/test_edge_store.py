"""The model store: signed bundles in, atomic switches, rollback, pruning, and every kind of bad bundle refused."""

from __future__ import annotations

import io
import json
import stat
import tarfile

import numpy as np
import pytest

from edge.errors import BundleRefused, StoreError
from edge.signing import sign_manifest
from edge.store.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, SIGNATURE_FILE, parse_manifest
from edge.store.model_store import ModelStore
from tests.edge_helpers import read_members, write_members


@pytest.fixture
def events():
    return []


@pytest.fixture
def store(tmp_path, bundle_kit, events) -> ModelStore:
    return ModelStore(tmp_path / "store", bundle_kit.trusted_keys(), keep=3,
                      on_event=lambda event, version, reason: events.append((event, version, reason)))


def test_install_activates_and_makes_files_read_only(store, bundle_kit, events):
    manifest = store.install(bundle_kit.bundle("v1", large="tflite_fp32"))
    state = store.state()
    assert state.active == "v1" and state.installed == ["v1"] and store.problems() == []
    folder = store.version_dir("v1")
    assert {p.name for p in folder.iterdir()} == {MANIFEST_FILE, SIGNATURE_FILE} | {f.name for f in manifest.files}
    assert all(not (p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)) for p in folder.iterdir())
    assert not (folder.stat().st_mode & stat.S_IWUSR)
    loaded = store.load("v1")
    assert loaded.large is not None and loaded.manifest.sample.output_shape == [16, 10]
    assert ("installed", "v1", "") in events and ("activated", "v1", "") in events
    assert list(store.staging_dir.iterdir()) == []


def test_reinstalling_the_same_bundle_is_a_no_op(store, bundle_kit):
    bundle = bundle_kit.bundle("v1")
    store.install(bundle)
    store.install(bundle)
    assert store.state().installed == ["v1"] and store.problems() == []


def test_rollback_and_pruning_keep_active_and_previous(store, bundle_kit):
    for number in range(1, 5):
        store.install(bundle_kit.bundle(f"v{number}"))
    state = store.state()
    assert state.active == "v4" and state.previous == "v3"
    assert state.installed == ["v2", "v3", "v4"]  # keep=3: the oldest went
    assert not store.version_dir("v1").exists()
    assert store.rollback("canary unhealthy") == "v3"
    state = store.state()
    assert state.active == "v3" and state.rolled_back == {"v4": "canary unhealthy"}
    assert store.rollback("again") == "v2"
    with pytest.raises(StoreError, match="nothing to roll back to"):
        store.rollback("once more")
    store.install(bundle_kit.bundle("v5"))  # v2 active before: v5 active, v2 previous, both protected
    state = store.state()
    assert state.active == "v5" and state.previous == "v2" and {"v2", "v5"} <= set(state.installed)
    assert len(state.installed) == 3 and store.problems() == []


def test_an_untrusted_key_is_refused(tmp_path, store, bundle_kit):
    from tasks.registry.bundle import generate_keypair, load_private_key

    private_path, _ = generate_keypair(tmp_path / "other", "stranger")
    members = read_members(bundle_kit.bundle("v1"))
    members[SIGNATURE_FILE] = sign_manifest(members[MANIFEST_FILE], load_private_key(private_path))
    with pytest.raises(BundleRefused) as refused:
        store.install(write_members(tmp_path / "stranger.tar.gz", members))
    assert refused.value.reason == "unknown_key" and "does not trust" in str(refused.value)


def _unsigned(members):
    members.pop(SIGNATURE_FILE)


def _altered_manifest(members):  # signed bytes changed after signing: e.g. a different sha256
    manifest = json.loads(members[MANIFEST_FILE])
    manifest["variant"] = "something-else"
    members[MANIFEST_FILE] = json.dumps(manifest).encode()


def _tampered_model(members):
    name = next(n for n in members if n.endswith(".tflite"))
    content = bytearray(members[name])
    content[len(content) // 2] ^= 0xFF
    members[name] = bytes(content)


def _truncated_model(members):
    name = next(n for n in members if n.endswith(".tflite"))
    members[name] = members[name][: len(members[name]) // 2]


def _missing_sample(members):
    members.pop("sample.npy")


def _extra_file(members):
    members["payload.sh"] = b"#!/bin/sh\nrm -rf /\n"


def _garbage_signature(members):
    members[SIGNATURE_FILE] = b"not json"


def _key_id_list(members):  # was a TypeError (a 500 from /v1/model/install), not a refusal
    record = json.loads(members[SIGNATURE_FILE])
    members[SIGNATURE_FILE] = json.dumps({**record, "key_id": [record["key_id"]]}).encode()


def _huge_signature(members):
    members[SIGNATURE_FILE] = b"[" * 10**6 + b"]" * 10**6


def _huge_manifest(members):  # read no further than the limit: the signature cannot match the first bytes
    members[MANIFEST_FILE] = members[MANIFEST_FILE] + b" " * (2 * MAX_MANIFEST_BYTES)


@pytest.mark.parametrize("damage, reason", [
    (_unsigned, "unsigned"), (_garbage_signature, "unsigned"), (_key_id_list, "unsigned"),
    (_huge_signature, "unsigned"), (_huge_manifest, "bad_signature"), (_altered_manifest, "bad_signature"),
    (_tampered_model, "tampered"), (_truncated_model, "truncated"), (_missing_sample, "truncated"),
    (_extra_file, "unexpected_file"),
])
def test_damaged_bundles_are_refused_and_change_nothing(tmp_path, store, bundle_kit, events, damage, reason):
    store.install(bundle_kit.bundle("v1"))
    before = store.state()
    members = read_members(bundle_kit.bundle("v2"))
    damage(members)
    with pytest.raises(BundleRefused) as refused:
        store.install(write_members(tmp_path / "damaged.tar.gz", members))
    assert refused.value.reason == reason
    after = store.state()
    assert (after.active, after.history, after.installed) == (before.active, before.history, before.installed)
    assert after.refused == {reason: 1} and not store.version_dir("v2").exists()
    assert list(store.staging_dir.iterdir()) == [] and store.problems() == []
    assert any(event == "refused" and why.startswith(reason) for event, _, why in events)


@pytest.mark.parametrize("members, links, reason", [
    ({"../escape": b"x"}, None, "malformed"),
    ({"sub/dir.txt": b"x"}, None, "malformed"),
    ({}, {"manifest.json": "/etc/passwd"}, "malformed"),
    ({"only.txt": b"x"}, None, "malformed"),  # no manifest at all
])
def test_unsafe_archives_are_refused(tmp_path, store, members, links, reason):
    with pytest.raises(BundleRefused) as refused:
        store.install(write_members(tmp_path / "unsafe.tar.gz", members, links))
    assert refused.value.reason == reason
    assert not (tmp_path / "escape").exists() and store.state().active is None


def test_a_cut_download_is_truncated(tmp_path, store, bundle_kit):
    content = bundle_kit.bundle("v1").read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(content[: len(content) * 2 // 3])
    with pytest.raises(BundleRefused) as refused:
        store.install(cut)
    assert refused.value.reason == "truncated" and store.state().active is None


def test_a_bundle_over_the_size_limit_is_refused(tmp_path, bundle_kit):
    small = ModelStore(tmp_path / "small", bundle_kit.trusted_keys(), max_bundle_bytes=10_000)
    with pytest.raises(BundleRefused) as refused:
        small.install(bundle_kit.bundle("v1"))
    assert refused.value.reason == "too_large"


def test_a_version_is_immutable(tmp_path, store, bundle_kit):
    store.install(bundle_kit.bundle("v1"))
    with pytest.raises(BundleRefused) as refused:
        store.install(bundle_kit.bundle("v1", primary="onnx_int8", name="v1-other.tar.gz"))
    assert refused.value.reason == "version_conflict"


def test_a_version_failing_its_health_check_is_rolled_back(tmp_path, store, bundle_kit, events):
    """Signed, intact, but its sample does not give the labels the control plane saw: never activated."""
    from tasks.registry.bundle import write_bundle

    store.install(bundle_kit.bundle("v1"))
    members = read_members(bundle_kit.bundle("v2"))
    manifest = parse_manifest(members[MANIFEST_FILE])
    wrong = [(label + 1) % 10 for label in manifest.sample.expected_labels]
    payload = tmp_path / "payload"
    payload.mkdir()
    for name, content in members.items():
        (payload / name).write_bytes(content)
    bad = manifest.replace(sample=manifest.sample.replace(expected_labels=wrong))
    bundle = write_bundle(tmp_path / "bad.tar.gz", bad, payload, bundle_kit.private_key)
    with pytest.raises(BundleRefused) as refused:
        store.install(bundle)
    assert refused.value.reason == "health_check"
    state = store.state()
    assert state.active == "v1" and "v2" in state.rolled_back
    assert any(event == "rolled_back" and version == "v2" for event, version, _ in events)


def test_disk_corruption_of_an_installed_version_is_caught_on_load(store, bundle_kit):
    store.install(bundle_kit.bundle("v1"))
    model = next(store.version_dir("v1").glob("*.tflite"))
    model.chmod(0o644)
    with open(model, "r+b") as handle:
        handle.seek(100)
        handle.write(b"\x00\x00\x00\x00")
    with pytest.raises(BundleRefused) as refused:
        store.load("v1")
    assert refused.value.reason == "tampered"
    assert store.problems() and "does not verify" in store.problems()[0]


def test_store_recovers_what_a_killed_install_left(tmp_path, store, bundle_kit):
    store.install(bundle_kit.bundle("v1"))
    (store.staging_dir / "install-abc").mkdir()
    (store.staging_dir / "install-abc" / "half.tflite").write_bytes(b"half")
    reopened = ModelStore(store.root, bundle_kit.trusted_keys())
    assert list(reopened.staging_dir.iterdir()) == [] and reopened.problems() == []


def test_manifest_sample_is_a_real_batch(store, bundle_kit):
    store.install(bundle_kit.bundle("v1"))
    sample = np.load(store.version_dir("v1") / "sample.npy")
    assert sample.shape == (16, 8, 8, 1) and sample.dtype == np.float32 and sample.std() > 0


def test_a_decompression_bomb_is_refused_before_it_fills_memory_or_disk(tmp_path, bundle_kit):
    """A pax header of 64 MiB (tarfile reads such headers whole) in a gzip of a few hundred KiB."""
    import gzip

    small = ModelStore(tmp_path / "small", bundle_kit.trusted_keys(), max_bundle_bytes=2**20)
    bomb = tmp_path / "bomb.tar.gz"
    info = tarfile.TarInfo("manifest.json")
    info.pax_headers = {"comment": "x" * (64 * 2**20)}
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        archive.addfile(info, io.BytesIO(b""))
    bomb.write_bytes(gzip.compress(raw.getvalue()))
    assert bomb.stat().st_size < 2**20
    with pytest.raises(BundleRefused) as refused:
        small.install(bomb)
    assert refused.value.reason == "too_large" and small.state().active is None


def test_a_folder_bundle_with_a_symlink_is_refused(tmp_path, store, bundle_kit):
    folder = tmp_path / "folder"
    folder.mkdir()
    for name, content in read_members(bundle_kit.bundle("v1")).items():
        (folder / name).write_bytes(content)
    store.install(folder)  # a folder bundle installs like the archive
    (folder / "sample.npy").unlink()
    (folder / "sample.npy").symlink_to("/etc/passwd")
    with pytest.raises(BundleRefused) as refused:
        store.install(folder)
    assert refused.value.reason == "malformed"
    assert store.state().refused == {"malformed": 1}  # counted for the metrics, whichever process installs


def test_a_prune_killed_before_its_record_leaves_no_ghost_in_the_history(store, bundle_kit):
    for number in (1, 2, 3):
        store.install(bundle_kit.bundle(f"v{number}"))
    store.rollback("test")  # active v2, history [v1, v2]
    victim = store.version_dir("v1")  # as if a prune had renamed v1 away and died before writing state.json
    victim.chmod(0o755)
    victim.rename(store.staging_dir / "prune-v1-x")
    reopened = ModelStore(store.root, bundle_kit.trusted_keys())
    state = reopened.state()
    assert "v1" not in state.history and "v1" not in state.installed and state.active == "v2"
    assert reopened.problems() == [] and list(reopened.staging_dir.iterdir()) == []
