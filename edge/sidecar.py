"""Model metadata sidecars: ``<model file>.json`` beside every model file.

A sidecar records what a device needs to run and trust a model file: tensor names, shapes,
dtypes, quantization parameters, labels, lineage and the file's sha256.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from edge.errors import SidecarError


def sidecar_path(model_path: Path) -> Path:
    """Where the sidecar of ``model_path`` lives."""
    return model_path.with_name(model_path.name + ".json")


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large models do not need to fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """A binary handle whose content replaces ``path`` only when the block ends without an error.

    A temp file in the same folder, flushed to disk, then renamed over the target (atomic on POSIX);
    a crash leaves at most a hidden ``.<name>.*.tmp`` behind, never a truncated file under the real name.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, content: bytes) -> None:
    """Write a file so readers see the old content or the new one, never half of it."""
    with atomic_writer(path) as handle:
        handle.write(content)


def atomic_write_text(path: Path, text: str) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_sidecar(model_path: Path, metadata: dict[str, Any]) -> Path:
    """Write the sidecar for ``model_path``, adding its sha256 and size."""
    record = {**metadata, "file": model_path.name, "sha256": sha256_file(model_path),
              "size_bytes": model_path.stat().st_size}
    target = sidecar_path(model_path)
    atomic_write_text(target, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return target


def read_sidecar(model_path: Path) -> dict[str, Any]:
    """Read the sidecar of ``model_path``; raise :class:`SidecarError` when absent or malformed."""
    path = sidecar_path(model_path)
    if not path.is_file():
        raise SidecarError(f"no metadata sidecar {path} for {model_path}; re-run the convert stage")
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise SidecarError(f"sidecar {path} is not valid JSON ({error}); re-run the convert stage") from error
    if not isinstance(record, dict) or "sha256" not in record:
        raise SidecarError(f"sidecar {path} has no sha256 field; re-run the convert stage")
    return record


def verify_model_file(model_path: Path) -> dict[str, Any]:
    """Check ``model_path`` against its sidecar's sha256 and return the sidecar."""
    record = read_sidecar(model_path)
    actual = sha256_file(model_path)
    if actual != record["sha256"]:
        raise SidecarError(
            f"{model_path} does not match its sidecar (sha256 {actual[:12]}... != {record['sha256'][:12]}...): "
            "the file is corrupt or was replaced; fetch it again"
        )
    return record
