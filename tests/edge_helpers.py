"""Helpers for the tests that run the real edge inference service (``python -m edge.serving.serve``) on loopback."""

from __future__ import annotations

import io
import re
import tarfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

ADMIN_TOKEN = "test-admin-token"


def read_members(bundle: Path) -> dict[str, bytes]:
    """The files of a bundle archive by name."""
    with tarfile.open(bundle) as archive:
        return {member.name: archive.extractfile(member).read() for member in archive}


def write_members(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    """A bundle archive of ``members`` (and symlinks ``links``), as an attacker or a broken packer would write it."""
    with tarfile.open(path, "w:gz") as archive:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            archive.addfile(info, io.BytesIO(content))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return path


@dataclass
class EdgeServer:
    url: str
    store: Path
    samples: Path
    outbox: Path
    sensor: Path
    run_dir: Path

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30.0)

    def predict(self, inputs: np.ndarray, npy: bool = False) -> httpx.Response:
        with self.client() as client:
            if npy:
                buffer = io.BytesIO()
                np.save(buffer, inputs)
                return client.post("/v1/predict", content=buffer.getvalue(),
                                   headers={"content-type": "application/x-npy"})
            return client.post("/v1/predict", json={"inputs": np.asarray(inputs).tolist()})

    def admin(self, path: str, content: bytes | None = None) -> httpx.Response:
        with self.client() as client:
            return client.post(path, content=content, headers={"authorization": f"Bearer {ADMIN_TOKEN}"})

    def metric(self, name: str, **labels: str) -> float:
        """The value of one sample of ``name`` (with exactly these labels); 0.0 when absent."""
        with self.client() as client:
            text = client.get("/metrics").text
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in text.splitlines():
            match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
            if match and ",".join(sorted((match.group(1) or "").split(","))) == wanted:
                return float(match.group(2))
        return 0.0


def settings_for(root: Path, public_dir: Path, **overrides: object) -> dict[str, str]:
    settings = {"store": root / "store", "public_keys": public_dir, "admin_token": ADMIN_TOKEN,
                "samples_dir": root / "samples", "upload_to": root / "outbox", "thermal_sensor": root / "temp",
                "thermal_limit_c": 85, "watch_interval_s": 0.2, "device_id": "test-device", "num_threads": 1}
    settings.update(overrides)
    return {key: str(value) for key, value in settings.items() if value is not None}


@contextmanager
def running_edge_server(root: Path, public_dir: Path, **overrides: object) -> Iterator[EdgeServer]:
    """Start the service with its own store, samples, outbox and a writable fake thermal sensor."""
    from tasks.stack import services
    root.mkdir(parents=True, exist_ok=True)
    sensor = root / "temp"
    if not sensor.exists():
        sensor.write_text("30000\n")
    run_dir = root / "run"
    service = services.start_edge_server(run_dir, services.free_port(), settings_for(root, public_dir, **overrides))
    try:
        yield EdgeServer(service.url, root / "store", root / "samples", root / "outbox", sensor, run_dir)
    finally:
        services.stop("edge-serve", run_dir)


def sample_file_bytes(tmp_path: Path, device: str = "dev-1", compress: bool = False, **changes: np.ndarray) -> bytes:
    """A valid device sample file, with ``changes`` replacing (or, as None, removing) arrays."""
    from edge.sampling.sampler import Sampler, SampleStore

    store = SampleStore(tmp_path / f"store-{len(list(tmp_path.iterdir()))}")
    probabilities = np.full((5, 10), 0.1, np.float32)
    Sampler(store, device, sample_rate=1.0, seed=0).offer(np.random.default_rng(0).random((5, 4)),
                                                          probabilities, 1.0, "v1")
    with np.load(store.close_segment(), allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays.update(changes)
    buffer = io.BytesIO()
    (np.savez_compressed if compress else np.savez)(buffer, **{k: v for k, v in arrays.items() if v is not None})
    return buffer.getvalue()
