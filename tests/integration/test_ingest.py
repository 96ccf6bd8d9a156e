"""The ingest service for real (uvicorn on loopback) and a device uploading to it through an outage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from edge.errors import UploadError
from edge.identity import DEVICE_ID_RULE, UPLOAD_NAME_RULE, upload_owner
from edge.sampling.sampler import Sampler, SampleStore
from edge.sampling.upload import HttpTarget, Uploader
from tasks.monitoring.collected import consolidate
from tasks.monitoring.ingest import add_device, main
from tasks.stack import services
from tests.edge_helpers import sample_file_bytes
from tests.stack_helpers import wait_for

pytestmark = pytest.mark.integration
MAX_UPLOAD_MB = 0.25


@dataclass
class Ingest:
    url: str
    collected_dir: Path
    run_dir: Path
    command: list[str]
    tokens: dict[str, str]

    def start(self) -> None:
        services.start("ingest", self.command, self.run_dir, {}, f"{self.url}/healthz", self.url, timeout_s=60)

    def kill(self) -> None:
        """SIGKILL, as a crash or a pulled cable would: no graceful shutdown."""
        pid = services.running_pid(self.run_dir, "ingest")
        assert pid is not None, "the ingest service is not running"
        os.killpg(pid, signal.SIGKILL)
        wait_for(lambda: services.running_pid(self.run_dir, "ingest") is None, 10, "the service to die",
                 interval_s=0.05)

    def stored_ids(self, device: str = "") -> list[str]:
        """Sample ids in collected_dir, of one device's files or of all."""
        ids = []
        for path in sorted(self.collected_dir.glob(f"{device}{'--' if device else ''}*.npz")):
            with np.load(path, allow_pickle=False) as archive:
                ids.extend(archive["sample_id"].tolist())
        return ids


@pytest.fixture(scope="module")
def ingest(tmp_path_factory) -> Iterator[Ingest]:
    root = tmp_path_factory.mktemp("ingest")
    tokens_file = root / "tokens.json"
    tokens = {device: add_device(tokens_file, device) for device in ("dev-1", "dev-2", "outage-dev")}
    port = services.free_port()
    command = [sys.executable, "-m", "tasks.monitoring.ingest", "serve", "--tokens", str(tokens_file),
               "--collected-dir", str(root / "collected"), "--port", str(port), "--max-upload-mb", str(MAX_UPLOAD_MB)]
    service = Ingest(f"http://127.0.0.1:{port}", root / "collected", root / "run", command, tokens)
    service.start()
    try:
        yield service
    finally:
        services.stop("ingest", service.run_dir)


class RecordingStore(SampleStore):
    """A real store that also remembers the id of every sample it wrote."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.written_ids: list[str] = []

    def append(self, rows):
        written = super().append(rows)
        self.written_ids.extend(rows.sample_ids)
        return written


class DiskWatcher(threading.Thread):
    """Samples the bytes under a folder every few milliseconds, to catch any moment over the budget."""

    def __init__(self, directory: Path) -> None:
        super().__init__(daemon=True)
        self.directory = directory
        self.peak = 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.003):
            total = 0
            for path in self.directory.rglob("*"):
                with contextlib.suppress(FileNotFoundError):  # renamed or deleted between listing and stat
                    total += path.stat().st_size if path.is_file() else 0
            self.peak = max(self.peak, total)


def test_an_outage_loses_nothing_inside_the_budget(ingest, tmp_path):
    budget = 64 * 1024
    store = RecordingStore(tmp_path / "samples", budget_bytes=budget, records_per_file=32, max_file_age_s=0.3)
    sampler = Sampler(store, "outage-dev", sample_rate=0.3, confidence_floor=0.5, seed=0)
    target = HttpTarget(f"{ingest.url}/v1/ingest", "outage-dev", ingest.tokens["outage-dev"], timeout_s=2.0)
    uploader = Uploader(store, target, initial_backoff_s=0.05, max_backoff_s=0.4, poll_interval_s=0.05, seed=0)
    traffic_on = threading.Event()
    traffic_on.set()

    def traffic() -> None:  # steady requests: 4 rows every 5 ms, about a third of them kept
        rng = np.random.default_rng(1)
        while traffic_on.is_set():
            probabilities = rng.dirichlet(np.full(10, 0.3), size=4).astype(np.float32)
            sampler.offer(rng.random((4, 8, 8, 1), dtype=np.float32), probabilities, 5.0, "v1")
            time.sleep(0.005)  # pacing the load generator, not waiting for a result

    watcher = DiskWatcher(tmp_path / "samples")
    threads = [threading.Thread(target=traffic, daemon=True), watcher]
    for thread in threads:
        thread.start()
    uploader.start()
    try:
        wait_for(lambda: uploader.uploaded_files >= 5, 30, "uploads before the outage", interval_s=0.05)
        ingest.kill()
        wait_for(lambda: store.dropped_files >= 2 and uploader.failed_attempts >= 3, 30,
                   "the budget to fill and uploads to fail while the service is down", interval_s=0.05)
        failures_during_outage, uploaded_before = uploader.failed_attempts, uploader.uploaded_files
        ingest.start()
        wait_for(lambda: uploader.uploaded_files > uploaded_before and not uploader.consecutive_failures, 30,
                   "uploads to resume", interval_s=0.05)
        traffic_on.clear()
        threads[0].join()
        store.close_segment()
        wait_for(lambda: uploader.backlog_files == 0, 30, "the backlog to drain", interval_s=0.05)
    finally:
        traffic_on.clear()
        uploader.stop()
        watcher.done.set()
        target.close()

    stored, written = ingest.stored_ids("outage-dev"), store.written_ids
    assert len(stored) == len(set(stored)), "a sample reached collected_dir twice"
    assert set(stored) <= set(written) and store.records_written == len(written)
    assert len(stored) == len(written) - store.dropped_records
    assert store.dropped_records > 0 and failures_during_outage >= 3
    assert watcher.peak <= budget, f"the store used {watcher.peak} bytes on disk, over its {budget} byte budget"
    assert consolidate(ingest.collected_dir, consume=False).rows == len(ingest.stored_ids())  # all valid for drift


def _post(ingest: Ingest, content: bytes | Iterator[bytes], device: str = "dev-1", token: str | None = None,
          name: str = "0000000001-x.npz", headers: dict[str, str] | None = None) -> httpx.Response:
    """POST ``content`` as ``device`` with dev-1's token, another ``token``, or none (``token=""``)."""
    token = ingest.tokens["dev-1"] if token is None else token
    sent = {"X-Edgeloop-Device": device, "X-Edgeloop-Filename": name, **(headers or {})}
    if token:
        sent["Authorization"] = f"Bearer {token}"
    return httpx.post(f"{ingest.url}/v1/ingest", content=content, headers=sent, timeout=10)


def test_refuses_unauthenticated_oversized_and_malformed_uploads(ingest, tmp_path):
    valid = sample_file_bytes(tmp_path)
    assert _post(ingest, valid, token="").status_code == 401
    assert _post(ingest, valid, token="not-a-token").status_code == 401
    assert _post(ingest, valid, token=ingest.tokens["dev-2"]).status_code == 403  # dev-2's token, dev-1's name
    too_large = b"\0" * int(MAX_UPLOAD_MB * 2**20 + 1)
    assert _post(ingest, too_large).status_code == 413  # Content-Length says so: refused before reading
    chunks = iter([b"\0" * 65536] * 8)  # chunked, no Content-Length: refused while reading
    assert _post(ingest, chunks).status_code == 413
    malformed = {
        "not a readable .npz": b"garbage",
        "missing arrays ['sample_id']": sample_file_bytes(tmp_path, sample_id=None),
        "features has NaN": sample_file_bytes(tmp_path, features=np.full((5, 17), np.nan, np.float32)),
        "confidence values must lie within [0, 1]": sample_file_bytes(tmp_path, confidence=np.full(5, 1.5, np.float32)),
        "confidence must be 5 rows of float32": sample_file_bytes(tmp_path, confidence=np.ones(5)),
        "device_id column names ['dev-2']": sample_file_bytes(tmp_path, device="dev-2"),
        "object arrays need pickle": sample_file_bytes(tmp_path, reason=np.array(["rate"] * 5, dtype=object)),
        "arrays declare": sample_file_bytes(tmp_path, compress=True, x=np.zeros((5, 10**6), np.float32)),  # zip bomb
    }
    for problem, content in malformed.items():
        response = _post(ingest, content)
        assert response.status_code == 422 and problem in response.json()["detail"], (problem, response.text)
    assert _post(ingest, valid, name="../escape.npz").status_code == 422
    assert not list(ingest.collected_dir.glob("*0000000001-x.npz"))


def test_device_ids_and_file_names_outside_the_one_rule_are_refused(ingest, tmp_path):
    """Device ``site`` could write ``site--a--1.npz`` (read as device ``site--a``'s) if either part could hold
    ``--``: both are refused with the rule, before the token is even looked at, and nothing is stored."""
    valid = sample_file_bytes(tmp_path)
    for device in ("dev-1--a", "dev/1", "dev+1", "-dev-1", "dev-1.", "", "d" * 65):
        response = _post(ingest, valid, device=device)
        assert response.status_code == 422 and DEVICE_ID_RULE in response.json()["detail"], (device, response.text)
    for name in ("a--1.npz", "../escape.npz", ".hidden.npz", "a/b.npz", "a..npz", "x.npz.part", "x" * 130 + ".npz"):
        response = _post(ingest, valid, name=name)
        assert response.status_code == 422 and UPLOAD_NAME_RULE in response.json()["detail"], (name, response.text)
    assert not [path.name for path in ingest.collected_dir.glob("*.npz") if upload_owner(path.name) is None]
    accepted = _post(ingest, valid, name="0000000009-a-1.npz")
    assert accepted.status_code == 200 and upload_owner(accepted.json()["stored"]) == "dev-1"


def test_http_target_tells_refused_files_from_transient_failures(ingest, tmp_path):
    refused, valid = tmp_path / "0000000004-refused.npz", tmp_path / "0000000005-valid.npz"
    refused.write_bytes(sample_file_bytes(tmp_path, device="dev-2"))
    valid.write_bytes(sample_file_bytes(tmp_path))
    url = f"{ingest.url}/v1/ingest"
    with HttpTarget(url, "dev-1", ingest.tokens["dev-1"]) as target, HttpTarget(url, "dev-1", "wrong") as impostor, \
            HttpTarget(f"http://127.0.0.1:{services.free_port()}/v1/ingest", "dev-1", "t") as nobody:
        with pytest.raises(UploadError, match="HTTP 422") as rejected:
            target.send(refused)
        with pytest.raises(UploadError, match="HTTP 401.*check this device's token") as unauthorised:
            impostor.send(valid)
        with pytest.raises(UploadError, match="did not answer") as unreachable:
            nobody.send(valid)
        target.send(valid)
    assert rejected.value.permanent and not unauthorised.value.permanent and not unreachable.value.permanent
    assert (ingest.collected_dir / f"dev-1--{valid.name}").read_bytes() == valid.read_bytes()


def test_a_resent_file_is_stored_once_and_confirmed_again(ingest, tmp_path):
    content = sample_file_bytes(tmp_path)
    digest = hashlib.sha256(content).hexdigest()
    first = _post(ingest, content, name="0000000002-y.npz", headers={"X-Content-SHA256": digest})
    again = _post(ingest, content, name="0000000002-y.npz", headers={"X-Content-SHA256": digest})
    assert first.status_code == again.status_code == 200
    assert first.json() == again.json() == {"sha256": digest, "stored": "dev-1--0000000002-y.npz", "samples": 5}
    assert (ingest.collected_dir / "dev-1--0000000002-y.npz").read_bytes() == content
    other = _post(ingest, sample_file_bytes(tmp_path, confidence=np.full(5, 0.2, np.float32)), name="0000000002-y.npz")
    assert other.status_code == 409 and "different file" in other.json()["detail"]
    damaged = _post(ingest, content, name="0000000003-z.npz", headers={"X-Content-SHA256": "0" * 64})
    assert damaged.status_code == 400 and not (ingest.collected_dir / "dev-1--0000000003-z.npz").exists()


def test_add_device_prints_a_token_once_and_keeps_only_its_hash(tmp_path, capsys):
    tokens_file = tmp_path / "tokens.json"
    assert main(["add-device", "cam-7", "--tokens", str(tokens_file)]) == 0
    token = capsys.readouterr().out.strip()
    stored = json.loads(tokens_file.read_text())
    assert stored == {"cam-7": hashlib.sha256(token.encode()).hexdigest()} and token not in tokens_file.read_text()
    assert stat.S_IMODE(tokens_file.stat().st_mode) == 0o600
    assert main(["add-device", "cam-7", "--tokens", str(tokens_file)]) == 2
    assert capsys.readouterr().err.startswith("error: device 'cam-7' already has a token")
    assert main(["add-device", "cam-7", "--tokens", str(tokens_file), "--replace"]) == 0
    assert capsys.readouterr().out.strip() != token
    assert main(["serve", "--tokens", str(tmp_path / "missing.json"), "--collected-dir", str(tmp_path)]) == 2
    assert "add-device" in capsys.readouterr().err


def _ingest_counts(ingest: Ingest) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{ingest.url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name in ("edgeloop_ingest_refused_total", "edgeloop_ingest_stored_total")}


def test_every_refusal_is_counted_per_device_and_reason_and_made_up_ids_stay_unauthenticated(ingest, tmp_path):
    before = _ingest_counts(ingest)
    valid = sample_file_bytes(tmp_path)
    made_up = [f"attacker-{number}" for number in range(5)]
    for device in made_up:  # valid ids without a token: counted, but never as a label of their own
        assert _post(ingest, valid, device=device, token="").status_code == 401
    assert _post(ingest, valid, device="dev-1--a").status_code == 422
    assert _post(ingest, valid, token=ingest.tokens["dev-2"]).status_code == 403
    assert _post(ingest, valid, name="a--1.npz").status_code == 422
    assert _post(ingest, b"garbage", name="0000000011-m.npz").status_code == 422
    assert _post(ingest, valid, name="0000000012-s.npz").status_code == 200
    after = _ingest_counts(ingest)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    refused = "edgeloop_ingest_refused_total"
    assert grew(refused, device="unauthenticated", reason="unauthorized") == 5
    assert grew(refused, device="unauthenticated", reason="bad_device_id") == 1
    assert grew(refused, device="dev-2", reason="device_mismatch") == 1
    assert grew(refused, device="dev-1", reason="bad_file_name") == 1
    assert grew(refused, device="dev-1", reason="invalid_samples") == 1
    assert grew("edgeloop_ingest_stored_total", device="dev-1") == 1
    assert not [key for key in after if any(value in made_up for _, value in key[1])]
