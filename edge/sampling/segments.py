"""The on-disk format of sample records: CRC-framed open segments and the closed ``.npz`` they become.

An open segment is a header frame (feature names, raw input shape) followed by one frame per record::

    magic (4 bytes) | payload length (uint32 LE) | crc32 of payload (uint32 LE) | payload

A record's payload is ``uint16 LE meta length | meta JSON | features float32 | inputs float32``. A reader
keeps every frame up to the first one that is short or fails its CRC: that is the tail a crash tore
(the writer appends whole frames only), so every record a reader returns is exactly what was written.
"""

from __future__ import annotations

import io
import json
import os
import struct
import time
import uuid
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from edge.errors import SampleStoreError

FRAME = struct.Struct("<4sII")
META_LENGTH = struct.Struct("<H")
MAX_META_BYTES = 2**16 - 1
HEADER_MAGIC, RECORD_MAGIC = b"ELSH", b"ELSR"
FORMAT_VERSION = 1
REASONS = ("rate", "low_confidence")


@dataclass(frozen=True)
class SampleRows:
    """Rows a sampler keeps from one request, ready for :meth:`edge.sampling.store.SampleStore.append`."""

    features: np.ndarray  # (N, F) float32, columns named by feature_names
    feature_names: tuple[str, ...]
    confidence: np.ndarray  # (N,) top-class probability
    predicted: np.ndarray  # (N,) class index
    reasons: tuple[str, ...]  # per row, one of REASONS
    sample_ids: tuple[str, ...]  # per row, uuid4 hex (labels are joined on it later)
    latency_ms: float
    model_version: str
    device_id: str
    timestamp: float  # unix seconds
    inputs: np.ndarray | None = None  # (N, ...) float32 raw inputs, only when the store keeps them

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        return None if self.inputs is None else tuple(self.inputs.shape[1:])

    def without_inputs(self) -> SampleRows:
        return replace(self, inputs=None)


def file_name(sequence: int, suffix: str) -> str:
    """``<sequence>-<utc time>-<uuid8><suffix>``: the sequence first, so lexical order is age order even
    when a device's clock jumps; the uuid keeps names unique across devices and restarts."""
    now = time.time()
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f"{now % 1:.6f}"[1:] + "Z"
    return f"{sequence:010d}-{stamp}-{uuid.uuid4().hex[:8]}{suffix}"


def file_sequence(name: str) -> int:
    """The sequence number :func:`file_name` put in ``name`` (-1 for a name it did not make)."""
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else -1


def npz_record_count(path: Path) -> int:
    """Records in a closed ``.npz`` (0 when unreadable, so counters never fail a restart)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            return len(archive["confidence"])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile):
        return 0


def _frame(magic: bytes, payload: bytes) -> bytes:
    return FRAME.pack(magic, len(payload), zlib.crc32(payload)) + payload


@lru_cache(maxsize=16)
def encode_header(feature_names: tuple[str, ...], input_shape: tuple[int, ...] | None) -> bytes:
    """The header frame of a segment; records of one segment share it (else a new segment starts)."""
    header = {"format": FORMAT_VERSION, "feature_names": list(feature_names),
              "input_shape": None if input_shape is None else list(input_shape)}
    return _frame(HEADER_MAGIC, json.dumps(header).encode())


def encode_rows(rows: SampleRows) -> list[bytes]:
    """One record frame per row."""
    features = np.ascontiguousarray(rows.features, np.float32)
    inputs = None if rows.inputs is None else np.ascontiguousarray(rows.inputs, np.float32)
    frames = []
    for index, sample_id in enumerate(rows.sample_ids):
        meta = json.dumps({"id": sample_id, "t": rows.timestamp, "c": float(rows.confidence[index]),
                           "p": int(rows.predicted[index]), "l": rows.latency_ms, "v": rows.model_version,
                           "r": rows.reasons[index], "d": rows.device_id}).encode()
        if len(meta) > MAX_META_BYTES:
            raise SampleStoreError(f"sample metadata of {len(meta)} bytes is over {MAX_META_BYTES}: is the "
                                   f"model version {rows.model_version[:40]!r}... really that long?")
        raw = b"" if inputs is None else inputs[index].tobytes()
        frames.append(_frame(RECORD_MAGIC, META_LENGTH.pack(len(meta)) + meta + features[index].tobytes() + raw))
    return frames


@dataclass
class ParsedSegment:
    """The valid records of a segment file and how many bytes of torn tail followed them."""

    header: dict[str, Any] | None = None
    metas: list[dict[str, Any]] = field(default_factory=list)
    features: list[np.ndarray] = field(default_factory=list)
    inputs: list[np.ndarray] = field(default_factory=list)
    torn_bytes: int = 0

    @property
    def record_count(self) -> int:
        return len(self.metas)


def _frames(content: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
    """Whole, CRC-valid frames from the start of ``content``, and the number of bytes after them."""
    frames, offset = [], 0
    while offset + FRAME.size <= len(content):
        magic, length, crc = FRAME.unpack_from(content, offset)
        payload = content[offset + FRAME.size:offset + FRAME.size + length]
        if magic not in (HEADER_MAGIC, RECORD_MAGIC) or len(payload) != length or zlib.crc32(payload) != crc:
            break
        frames.append((magic, payload))
        offset += FRAME.size + length
    return frames, len(content) - offset


def read_segment(path: Path) -> ParsedSegment:
    """Parse a segment file; stops at the first torn or corrupt frame (see the module docstring).

    Never raises on content: a device must come back up whatever a crash left on its disk.
    """
    content = path.read_bytes()
    frames, torn = _frames(content)
    parsed = ParsedSegment(torn_bytes=torn)
    try:
        header = json.loads(frames[0][1]) if frames and frames[0][0] == HEADER_MAGIC else {}
        feature_count, input_shape = len(header["feature_names"]), header["input_shape"]
        if header["format"] != FORMAT_VERSION:
            raise ValueError(f"segment format {header['format']}")
    except (ValueError, KeyError, TypeError):
        parsed.torn_bytes = len(content)
        return parsed
    parsed.header = header
    input_values = int(np.prod(input_shape)) if input_shape is not None else 0
    for magic, payload in frames[1:]:
        try:
            (meta_length,) = META_LENGTH.unpack_from(payload)
            meta = json.loads(payload[META_LENGTH.size:META_LENGTH.size + meta_length])
            values = np.frombuffer(payload, np.float32, offset=META_LENGTH.size + meta_length)
            if magic != RECORD_MAGIC or len(values) != feature_count + input_values:
                raise ValueError("not a record this header describes")
        except (ValueError, struct.error):
            parsed.torn_bytes += FRAME.size + len(payload)  # the first bad frame ends the readable part
            break
        parsed.metas.append(meta)
        parsed.features.append(values[:feature_count])
        if input_shape is not None:
            parsed.inputs.append(values[feature_count:].reshape(input_shape))
    return parsed


def segment_npz_bytes(parsed: ParsedSegment) -> bytes:
    """The closed-file ``.npz`` of a parsed segment (no object arrays: loads with ``allow_pickle=False``)."""
    metas = parsed.metas
    arrays = {
        "features": np.stack(parsed.features).astype(np.float32),
        "feature_names": np.array(parsed.header["feature_names"], dtype=str),
        "confidence": np.array([m["c"] for m in metas], np.float32),
        "predicted": np.array([m["p"] for m in metas], np.int32),
        "latency_ms": np.array([m["l"] for m in metas], np.float32),
        "model_version": np.array([m["v"] for m in metas], dtype=str),
        "timestamp": np.array([m["t"] for m in metas], np.float64),
        "sample_id": np.array([m["id"] for m in metas], dtype=str),
        "reason": np.array([m["r"] for m in metas], dtype=str),
        "device_id": np.array([m["d"] for m in metas], dtype=str),
    }
    if parsed.inputs:
        arrays["x"] = np.stack(parsed.inputs).astype(np.float32)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


class Segment:
    """The open segment file: whole frames appended with one unbuffered write each."""

    def __init__(self, path: Path, header: bytes) -> None:
        self.path = path
        self.header = header
        self._handle = open(path, "xb", buffering=0)  # no context manager: it lives as long as the segment
        self._started = time.monotonic()
        self.size = 0
        self.records = 0
        self.write(header, record=False)

    def write(self, frame: bytes, record: bool = True) -> None:
        """Append one frame; unbuffered, so a process crash after this returns cannot lose it."""
        try:
            written = self._handle.write(frame)
            if written != len(frame):
                raise OSError(f"short write to {self.path} ({written} of {len(frame)} bytes): disk full?")
        except OSError:
            os.ftruncate(self._handle.fileno(), self.size)  # records appended later must follow a whole frame
            self._handle.seek(self.size)  # ... at the cut, not after a hole where the partial frame was
            raise
        self.size += len(frame)
        self.records += record

    def age_s(self) -> float:
        return time.monotonic() - self._started

    def finish(self) -> None:
        """Flush to disk and close the handle (the segment is about to become a closed file)."""
        if not self._handle.closed:
            os.fsync(self._handle.fileno())
            self._handle.close()
