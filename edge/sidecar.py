"""Model metadata sidecars: ``<model file>.json`` beside every model file.

A sidecar records what a device needs to run and trust a model file: tensor names, shapes,
dtypes, quantization parameters, labels, lineage and the file's sha256.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from edge.errors import SidecarError
from edge.files import atomic_write_text, sha256_file


def sidecar_path(model_path: Path) -> Path:
    """Where the sidecar of ``model_path`` lives."""
    return model_path.with_name(model_path.name + ".json")


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
