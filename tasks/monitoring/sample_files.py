"""What a device sample file must be before the control plane stores it: the checks ``edgeloop ingest`` runs.

A sample file is the ``.npz`` that ``edge.sampling.store`` closes (``edge.sampling.segments.segment_npz_bytes``
writes it): per-row arrays of equal length, derived ``features`` with their names, and raw ``x`` only
when the device stores raw inputs. Anything else is refused with a :class:`DataError` naming the
array and the problem, before a byte of it reaches ``drift.collected_dir``.
"""

from __future__ import annotations

import io
import zipfile
from collections.abc import Mapping

import numpy as np

from edge.sampling.segments import REASONS
from tasks.errors import DataError

PER_ROW = {"confidence": "float32", "predicted": "int32", "latency_ms": "float32", "model_version": "U",
           "timestamp": "float64", "sample_id": "U", "reason": "U", "device_id": "U"}
FINITE = ("features", "confidence", "latency_ms", "timestamp", "x")
MAX_EXPANSION = 16  # arrays may declare at most this many times the upload's bytes: no zip bombs


def column_names(arrays: Mapping[str, np.ndarray]) -> tuple[str, ...]:
    """The feature column names of a sample file, window or reference (``feature_names``), as strings."""
    return tuple(str(name) for name in arrays.get("feature_names", ()))


def _declared_bytes(archive: zipfile.ZipFile) -> int:
    """Bytes the arrays in ``archive`` say they hold, read from their .npy headers (nothing allocated)."""
    total = 0
    for member in archive.infolist():
        with archive.open(member) as handle:
            version = np.lib.format.read_magic(handle)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(handle)
            total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
    return total


def load_sample_arrays(content: bytes) -> dict[str, np.ndarray]:
    """The arrays of an uploaded .npz, loaded without pickle and only after their sizes are checked."""
    try:
        archive = np.load(io.BytesIO(content), allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile):
        raise DataError("body is not a readable .npz file (send the file edge.sampling.store closed)") from None
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError("body is a single .npy array, not an .npz archive of sample arrays")
    with archive:
        try:
            declared = _declared_bytes(archive.zip)
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            raise DataError(f"an array in the .npz has no readable header ({error})") from None
        if declared > MAX_EXPANSION * len(content):
            raise DataError(f"arrays declare {declared} bytes, over {MAX_EXPANSION}x the upload's size")
        try:
            return {key: archive[key] for key in archive.files}
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
            reason = "object arrays need pickle, which is refused" if "allow_pickle" in str(error) else str(error)
            raise DataError(f"an array cannot be read: {reason}") from None


def _check_layout(arrays: dict[str, np.ndarray]) -> int:
    """Required arrays present, with the right dtypes and one row per sample; returns the rows."""
    missing = sorted({"features", "feature_names", *PER_ROW} - set(arrays))
    if missing:
        raise DataError(f"missing arrays {missing}; expected a file closed by edge.sampling.store")
    features = arrays["features"]
    if features.dtype != np.float32 or features.ndim != 2 or len(features) == 0:
        raise DataError(f"features must be non-empty float32 (N, F), got {features.dtype} {features.shape}")
    names = arrays["feature_names"]
    if names.dtype.kind != "U" or names.shape != (features.shape[1],):
        raise DataError(f"feature_names must be {features.shape[1]} strings, got {names.dtype} {names.shape}")
    rows = len(features)
    for key, dtype in {**PER_ROW, **({"x": "float32"} if "x" in arrays else {})}.items():
        array = arrays[key]
        dtype_ok = array.dtype.kind == "U" if dtype == "U" else array.dtype == np.dtype(dtype)
        shape_ok = array.ndim >= 2 and len(array) == rows if key == "x" else array.shape == (rows,)
        if not dtype_ok or not shape_ok:
            raise DataError(f"{key} must be {rows} rows of {'strings' if dtype == 'U' else dtype}, "
                            f"got {array.dtype} {array.shape}")
    return rows


def validate_sample_file(content: bytes, device: str) -> int:
    """Check an upload is a well-formed sample file of ``device``; returns its rows, else raises DataError."""
    arrays = load_sample_arrays(content)
    rows = _check_layout(arrays)
    for key in FINITE:
        if key in arrays and not np.isfinite(arrays[key]).all():
            raise DataError(f"{key} has NaN or infinite values")
    if arrays["confidence"].min() < 0.0 or arrays["confidence"].max() > 1.0:
        raise DataError("confidence values must lie within [0, 1]")
    if (arrays["latency_ms"] < 0).any():
        raise DataError("latency_ms values must not be negative")
    unknown_reasons = set(arrays["reason"].tolist()) - set(REASONS)
    if unknown_reasons:
        raise DataError(f"reason values {sorted(unknown_reasons)} are not among {list(REASONS)}")
    if len(set(arrays["sample_id"].tolist())) != rows:
        raise DataError("sample_id values must be unique")
    other_devices = set(arrays["device_id"].tolist()) - {device}
    if other_devices:
        raise DataError(f"device_id column names {sorted(other_devices)}, but the token belongs to {device!r}")
    return rows
