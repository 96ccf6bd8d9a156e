"""Device uploads in ``drift.collected_dir`` become one validated window per check; bad uploads are quarantined.

The ingest endpoint stores each upload as ``<collected_dir>/<device>--<file>.npz``. A check takes every
pending upload and:

- attributes it to a device by :func:`edge.identity.upload_owner`, the rule the ingest endpoint names
  files by (neither part may hold ``--``, so the first ``--`` always ends the device id); a name that
  does not follow it is quarantined;
- validates it as a sample file of its device (:func:`tasks.monitoring.sample_files.validate_sample_file`:
  schema, dtypes, ranges, finite values, unique ids), checks its feature columns match the window's and
  that its model versions are known to the registry. A file that fails is moved to ``quarantine/`` with
  ``<name>.reason.txt`` next to it: never dropped, never a crash of the check;
- drops rows whose ``sample_id`` is already in this window or in the last :data:`RECENT_WINDOWS` windows
  (a device re-sending a file whose confirmation got lost), counting them;
- writes the rows as ``windows/<window_id>.npz`` (atomically), then moves the uploads to
  ``processed/<window_id>/``. A crash between the two leaves the uploads pending; the next check finds
  their ids in the window already written and drops them as duplicates, so no row is counted twice.

A window file holds the per-row arrays of the sample files (``features``, ``confidence``, ``predicted``,
``latency_ms``, ``model_version``, ``timestamp``, ``sample_id``, ``device_id``, ``reason``) plus
``feature_names``, and, for rows whose device stored raw inputs, ``x`` with ``x_sample_id`` naming them
(``edgeloop labels import`` joins labels to them).
"""

from __future__ import annotations

import io
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.files import atomic_write_bytes, atomic_write_text
from edge.identity import DEVICE_ID_RULE, UPLOAD_NAME_RULE, upload_owner
from tasks.errors import DataError
from tasks.monitoring.sample_files import PER_ROW, column_names, load_sample_arrays, validate_sample_file

log = logging.getLogger(__name__)
WINDOWS, PROCESSED, QUARANTINE = "windows", "processed", "quarantine"
RECENT_WINDOWS = 24  # earlier windows whose sample ids a new window is checked against
ROW_ARRAYS = ("features", *PER_ROW)


@dataclass
class Window:
    """One check's consolidated uploads."""

    window_id: str
    arrays: dict[str, np.ndarray]
    files: list[str] = field(default_factory=list)              # uploads taken into the window
    quarantined: dict[str, str] = field(default_factory=dict)   # upload -> reason
    duplicates: int = 0                                          # rows dropped as already seen
    path: Path | None = None                                     # the window file, once written

    @property
    def rows(self) -> int:
        return 0 if "features" not in self.arrays else len(self.arrays["features"])

    @property
    def feature_names(self) -> tuple[str, ...]:
        return column_names(self.arrays)


def new_window_id(now: float | None = None) -> str:
    """``YYYYmmddTHHMMSSZ-<hex>``: sorts by time, unique across workers."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    return f"{stamp}-{secrets.token_hex(3)}"


def pending_uploads(collected_dir: Path) -> list[Path]:
    return sorted(Path(collected_dir).glob("*.npz"))


def window_files(collected_dir: Path) -> list[Path]:
    """Every window file, oldest first."""
    return sorted((Path(collected_dir) / WINDOWS).glob("*.npz"))


def read_window(path: Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}


def _recent_ids(collected_dir: Path) -> set[str]:
    seen: set[str] = set()
    for path in window_files(collected_dir)[-RECENT_WINDOWS:]:
        try:
            with np.load(path, allow_pickle=False) as archive:
                seen.update(archive["sample_id"].tolist())
        except (OSError, ValueError, KeyError) as error:
            log.warning("window %s is unreadable (%s); its ids are not checked for duplicates", path.name, error)
    return seen


def quarantine(path: Path, reason: str) -> Path:
    """Move ``path`` to ``quarantine/`` with its reason beside it; returns the new path."""
    folder = path.parent / QUARANTINE
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / path.name
    if target.exists():  # the same name quarantined before: keep both
        target = folder / f"{path.stem}.{secrets.token_hex(3)}{path.suffix}"
    atomic_write_text(target.with_name(target.name + ".reason.txt"), reason.rstrip() + "\n")
    os.replace(path, target)
    log.warning("quarantined %s: %s", path.name, reason)
    return target


def _check_upload(path: Path, names: tuple[str, ...] | None, known_versions: set[str] | None
                  ) -> dict[str, np.ndarray]:
    device = upload_owner(path.name)
    if device is None:
        raise DataError(f"file name is not '<device>--<upload name>' as the ingest endpoint writes it (a device id "
                        f"is {DEVICE_ID_RULE}; an upload name is {UPLOAD_NAME_RULE}); upload it through "
                        "`edgeloop ingest`")
    try:
        content = path.read_bytes()
    except OSError as error:
        raise DataError(f"unreadable: {error}") from None
    validate_sample_file(content, device)
    arrays = load_sample_arrays(content)
    file_names = column_names(arrays)
    if names is not None and file_names != names:
        raise DataError(f"feature columns {list(file_names)} differ from the window's {list(names)} (a device "
                        "with another feature function version?)")
    if known_versions is not None:
        unknown = sorted(set(arrays["model_version"].tolist()) - known_versions)
        if unknown:
            raise DataError(f"model version(s) {unknown} are not registered versions of this model")
    return arrays


def _concatenate(parts: list[dict[str, np.ndarray]], names: tuple[str, ...]) -> dict[str, np.ndarray]:
    arrays = {key: np.concatenate([part[key] for part in parts]) for key in ROW_ARRAYS}
    arrays["feature_names"] = np.array(names, dtype=str)
    with_x = [part for part in parts if "x" in part]
    shapes = {part["x"].shape[1:] for part in with_x}
    if len(shapes) == 1:
        arrays["x"] = np.concatenate([part["x"] for part in with_x]).astype(np.float32)
        arrays["x_sample_id"] = np.concatenate([part["sample_id"] for part in with_x])
    elif shapes:
        log.warning("raw inputs of %d shapes in one window; raw inputs are not kept", len(shapes))
    return arrays


def _drop_seen(arrays: dict[str, np.ndarray], seen: set[str]) -> tuple[dict[str, np.ndarray], int]:
    ids = arrays["sample_id"].tolist()
    keep = np.ones(len(ids), bool)
    for index, sample_id in enumerate(ids):
        keep[index] = sample_id not in seen
        seen.add(sample_id)
    if keep.all():
        return arrays, 0
    kept = {key: (value[keep] if key in ROW_ARRAYS or key == "x" else value) for key, value in arrays.items()}
    return kept, int((~keep).sum())


def consolidate(collected_dir: Path, known_versions: set[str] | None = None, consume: bool = True,
                window_id: str | None = None) -> Window:
    """Validate every pending upload into one window (see the module docstring).

    ``consume=False`` reads and reports without writing the window or moving anything, except that
    malformed uploads are quarantined all the same. ``known_versions`` None skips the version check.
    """
    collected_dir = Path(collected_dir)
    window = Window(window_id or new_window_id(), {})
    seen = _recent_ids(collected_dir)
    parts: list[dict[str, np.ndarray]] = []
    names: tuple[str, ...] | None = None
    for path in pending_uploads(collected_dir):
        try:
            arrays = _check_upload(path, names, known_versions)
        except DataError as error:
            window.quarantined[path.name] = str(error)
            quarantine(path, str(error))
            continue
        names = column_names(arrays)
        arrays, dropped = _drop_seen(arrays, seen)
        window.duplicates += dropped
        window.files.append(path.name)
        if len(arrays["sample_id"]):
            parts.append(arrays)
    if parts and names is not None:
        window.arrays = _concatenate(parts, names)
    if consume and window.files:
        _write(collected_dir, window)
    return window


def _write(collected_dir: Path, window: Window) -> None:
    if window.rows:
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **window.arrays)
        window.path = collected_dir / WINDOWS / f"{window.window_id}.npz"
        atomic_write_bytes(window.path, buffer.getvalue())
    processed = collected_dir / PROCESSED / window.window_id
    processed.mkdir(parents=True, exist_ok=True)
    for name in window.files:
        shutil.move(str(collected_dir / name), processed / name)
