"""The bounded, append-only, crash-safe sample store on a device's disk.

Records are appended to one open segment (``open/``: CRC-framed records written whole, one write each,
so a crash loses at most the record being written) and segments are closed into ``.npz`` files
(``closed/``, written atomically) that the uploader ships. Everything on disk stays within
``budget_bytes``: when full, the oldest closed files go and ``dropped_files`` / ``dropped_records``
count them. The record and file formats live in :mod:`edge.sampling.segments`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from edge.errors import SampleStoreError
from edge.files import atomic_write_bytes
from edge.sampling.segments import (
    ParsedSegment,
    SampleRows,
    Segment,
    encode_header,
    encode_rows,
    file_name,
    file_sequence,
    npz_record_count,
    read_segment,
    segment_npz_bytes,
)

LOGGER = logging.getLogger(__name__)
MIN_BUDGET_BYTES = 16 * 1024
# A segment holds at most this share of the budget, so closing one (segment + its .npz, about as large)
# next to a file being uploaded always fits without evicting the upload in flight.
SEGMENT_SHARE_OF_BUDGET = 8


@dataclass
class _StoredFile:
    size: int
    records: int


class _FileQueue:
    """The files of one folder, oldest first, with a running byte total (no directory scans per write)."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files: dict[str, _StoredFile] = {}  # insertion order is age order: names only grow
        self.bytes = 0

    def add(self, name: str, size: int, records: int) -> None:
        self.files[name] = _StoredFile(size, records)
        self.bytes += size

    def pop(self, name: str) -> _StoredFile | None:
        entry = self.files.pop(name, None)
        self.bytes -= entry.size if entry else 0
        return entry

    def delete(self, name: str) -> _StoredFile | None:
        entry = self.pop(name)
        (self.folder / name).unlink(missing_ok=True)
        return entry


class SampleStore:
    """Append-only sample files under a byte budget: ``open/`` (one segment) and ``closed/`` (``.npz``).

    Closed files are named by :func:`edge.sampling.segments.file_name` (lexical order = age order). Files the
    receiver refused move to ``rejected/`` (kept for diagnosis, inside the budget, evicted first).
    Thread-safe: request handlers append while the uploader thread removes.
    """

    def __init__(self, directory: Path, budget_bytes: int = 50 * 2**20, records_per_file: int = 256,
                 max_file_age_s: float = 300.0, store_raw: bool = False) -> None:
        if budget_bytes < MIN_BUDGET_BYTES:
            raise SampleStoreError(f"sample budget_bytes {budget_bytes} is below the minimum {MIN_BUDGET_BYTES}")
        if records_per_file < 1 or max_file_age_s <= 0:
            raise SampleStoreError(f"records_per_file ({records_per_file}) must be >= 1 and max_file_age_s "
                                   f"({max_file_age_s}) > 0")
        self.directory = Path(directory)
        self.budget_bytes = budget_bytes
        self.records_per_file = records_per_file
        self.max_file_age_s = max_file_age_s
        self.store_raw = store_raw
        self.segment_limit_bytes = budget_bytes // SEGMENT_SHARE_OF_BUDGET
        self.records_written = 0
        self.dropped_files = 0
        self.dropped_records = 0
        self.rejected_files = 0
        self.recovered_records = 0
        self.torn_tail_bytes = 0
        self._lock = threading.RLock()
        self._closed = _FileQueue(self.directory / "closed")
        self._rejected = _FileQueue(self.directory / "rejected")
        self._segment: Segment | None = None
        self._in_flight: str | None = None
        try:
            self._recover()
        except OSError as error:
            raise SampleStoreError(f"sample folder {self.directory} is not usable ({error}); "
                                   "point the sample store at a writable folder") from error

    def _recover(self) -> None:
        """Pick up what an earlier run left: closed files, and segments a crash left open.

        An open segment's valid records go into an .npz; a torn tail record is dropped.
        """
        for queue in (self._closed, self._rejected):
            queue.folder.mkdir(parents=True, exist_ok=True)
            for leftover in queue.folder.glob(".*.tmp"):  # an atomic write a crash interrupted
                leftover.unlink()
            for path in sorted(queue.folder.glob("*.npz")):
                queue.add(path.name, path.stat().st_size, npz_record_count(path))
        (self.directory / "open").mkdir(exist_ok=True)
        segments = sorted((self.directory / "open").glob("*.seg"))
        names = [*self._closed.files, *self._rejected.files, *(path.name for path in segments)]
        self._next_sequence = 1 + max(map(file_sequence, names), default=-1)
        for path in segments:
            parsed = read_segment(path)
            if parsed.torn_bytes:
                LOGGER.warning("sample segment %s: dropped a torn tail of %d bytes", path.name, parsed.torn_bytes)
            self.torn_tail_bytes += parsed.torn_bytes
            self.recovered_records += parsed.record_count
            self._close_parsed(path, parsed, path.stat().st_size)
        self._make_room(0)  # the budget may have been lowered since the last run

    # ---- writing -------------------------------------------------------------------------------
    def append(self, rows: SampleRows) -> int:
        """Append ``rows`` (flushed per record); rotate and evict as needed. Returns the rows written."""
        if rows.inputs is not None and not self.store_raw:
            rows = rows.without_inputs()
        header = encode_header(rows.feature_names, rows.input_shape)
        frames = encode_rows(rows)
        largest = max((len(frame) for frame in frames), default=0) + len(header)
        if largest > self.segment_limit_bytes:
            raise SampleStoreError(
                f"a sample record of {largest} bytes exceeds the segment limit of {self.segment_limit_bytes} "
                f"bytes (budget_bytes / {SEGMENT_SHARE_OF_BUDGET}); raise budget_bytes or turn store_raw off")
        with self._lock:
            for frame in frames:
                segment = self._segment
                if segment is not None and (segment.header != header  # a new model: new columns
                                            or segment.size + len(frame) > self.segment_limit_bytes):
                    self.close_segment()
                if self._segment is None:
                    self._make_room(len(header) + len(frame))
                    self._segment = Segment(self._new_segment_path(), header)
                else:
                    self._make_room(len(frame))
                self._segment.write(frame)
                self.records_written += 1
                if self._segment.records >= self.records_per_file:
                    self.close_segment()
        return len(frames)

    def maybe_rotate(self) -> Path | None:
        """Close the open segment when it is older than ``max_file_age_s``; the uploader calls this."""
        with self._lock:
            if self._segment is not None and self._segment.age_s() >= self.max_file_age_s:
                return self.close_segment()
        return None

    def close_segment(self) -> Path | None:
        """Close the open segment into ``closed/<name>.npz`` (atomic); None when there was nothing to close.

        Call it on shutdown too, so the last records get uploaded.
        """
        with self._lock:
            segment, self._segment = self._segment, None
            if segment is None:
                return None
            segment.finish()
            return self._close_parsed(segment.path, read_segment(segment.path), segment.size)

    def _close_parsed(self, path: Path, parsed: ParsedSegment, segment_bytes: int) -> Path | None:
        """Write the .npz of a segment (the segment still on disk counts against the budget), then drop it."""
        if parsed.record_count == 0:
            path.unlink(missing_ok=True)
            return None
        content = segment_npz_bytes(parsed)
        self._make_room(len(content) + segment_bytes)
        target = self._closed.folder / path.with_suffix(".npz").name
        atomic_write_bytes(target, content)
        self._closed.pop(target.name)  # recovering a crash between this write and the unlink below: replaced
        self._closed.add(target.name, len(content), parsed.record_count)
        path.unlink()
        return target

    def _new_segment_path(self) -> Path:
        self._next_sequence += 1
        return self.directory / "open" / file_name(self._next_sequence - 1, ".seg")

    # ---- budget --------------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        """Bytes of every file in the store: open segment, closed and rejected files."""
        with self._lock:
            return (self._segment.size if self._segment else 0) + self._closed.bytes + self._rejected.bytes

    def _make_room(self, incoming: int) -> None:
        """Delete the oldest files until ``incoming`` more bytes fit the budget: rejected first, then closed.

        The file being uploaded goes last, and only when nothing else is left.
        """
        while self.bytes_used + incoming > self.budget_bytes:
            if self._rejected.files:
                self._rejected.delete(next(iter(self._rejected.files)))
                continue
            in_flight = self._in_flight if self._in_flight in self._closed.files else None
            oldest = next((name for name in self._closed.files if name != in_flight), in_flight)
            if oldest is None:
                raise SampleStoreError(f"{incoming} bytes cannot fit the sample budget of {self.budget_bytes} "
                                       "bytes even when empty; raise budget_bytes")
            records = self._closed.delete(oldest).records  # type: ignore[union-attr]  # oldest is queued
            self.dropped_files += 1
            self.dropped_records += records
            LOGGER.warning("sample budget full: dropped the oldest file %s (%d records)", oldest, records)

    # ---- files for the uploader ----------------------------------------------------------------
    def closed_files(self) -> list[Path]:
        """Closed files, oldest first."""
        with self._lock:
            return [self._closed.folder / name for name in self._closed.files]

    @property
    def closed_count(self) -> int:
        return len(self._closed.files)

    @property
    def closed_bytes(self) -> int:
        return self._closed.bytes

    def records_in(self, path: Path) -> int:
        """Records in a closed file (0 when it is gone)."""
        with self._lock:
            entry = self._closed.files.get(path.name)
            return entry.records if entry else 0

    @contextmanager
    def uploading(self, path: Path) -> Iterator[bool]:
        """Mark ``path`` as being uploaded (evicted last); yields False when it is already gone."""
        with self._lock:
            present = path.name in self._closed.files
            self._in_flight = path.name if present else None
        try:
            yield present
        finally:
            with self._lock:
                self._in_flight = None

    def remove(self, path: Path) -> None:
        """Delete a closed file (after a confirmed upload)."""
        with self._lock:
            self._closed.delete(path.name)

    def reject(self, path: Path) -> None:
        """Move a closed file the receiver refused to ``rejected/``, out of the upload queue."""
        with self._lock:
            entry = self._closed.pop(path.name)
            if entry is not None:
                os.replace(self._closed.folder / path.name, self._rejected.folder / path.name)
                self._rejected.add(path.name, entry.size, entry.records)
                self.rejected_files += 1
