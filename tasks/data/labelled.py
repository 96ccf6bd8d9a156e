"""Labelled device samples (``retrain.labelled_dir``): written by ``edgeloop labels import``, split by sample id.

Each import adds one file ``labelled-<UTC time>-<hash>.npz`` with ``x`` (float32), ``y`` (int64),
``sample_id`` (str) and ``labels`` (the class names ``y`` indexes). A stable hash of the sample id puts
every sample once and for all in the training part (the prepare stage appends it to the train split)
or the held-out part (challenger and champion are scored on it), so no sample a model was scored on
moves into training as more labels arrive. Files without ``sample_id`` (written by hand: ``x`` and
``y`` only) are held out entirely.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from tasks.config import RetrainParams
from tasks.contracts import Dataset
from tasks.data.sources import load_npz, validate_dataset
from tasks.errors import DataError
from tasks.workspace import save_arrays

DEFAULT_HOLDOUT_FRACTION: float = RetrainParams.model_fields["labelled_holdout_fraction"].default


@dataclass(frozen=True)
class LabelledFile:
    """One file of the labelled folder; ``sample_id`` and ``labels`` are None in hand-written files."""

    path: Path
    x: np.ndarray
    y: np.ndarray
    sample_id: np.ndarray | None
    labels: list[str] | None


def _read_file(path: Path) -> LabelledFile:
    dataset = load_npz(path)
    with np.load(path, allow_pickle=False) as archive:
        sample_id = archive["sample_id"] if "sample_id" in archive.files else None
        labels = [str(name) for name in archive["labels"]] if "labels" in archive.files else None
    if sample_id is not None and (sample_id.dtype.kind != "U" or sample_id.shape != dataset.y.shape):
        raise DataError(f"{path}: sample_id must be {len(dataset.y)} strings, one per row of y, got "
                        f"{sample_id.dtype} {sample_id.shape}")
    return LabelledFile(path, dataset.x, dataset.y, sample_id, labels)


def read_labelled_files(directory: Path) -> list[LabelledFile]:
    """Every ``.npz`` in ``directory``, oldest first (import file names start with their UTC time)."""
    files = sorted(directory.glob("*.npz")) if directory.is_dir() else []
    parts = [_read_file(path) for path in files]
    shapes = {part.x.shape[1:] for part in parts}
    if len(shapes) > 1:
        raise DataError(f"labelled files in {directory} have different image shapes {sorted(shapes)}")
    return parts


def is_held_out(sample_ids: np.ndarray, holdout_fraction: float) -> np.ndarray:
    """Per sample id: held out (True) or for training, from sha256 of the id alone (stable forever)."""
    position = [int.from_bytes(hashlib.sha256(str(sample_id).encode()).digest()[:8], "big") / 2**64
                for sample_id in sample_ids]
    return np.asarray(position, dtype=np.float64) < holdout_fraction


def _dataset(xs: list[np.ndarray], ys: list[np.ndarray], labels: list[str]) -> Dataset | None:
    if not xs or not sum(len(y) for y in ys):
        return None
    dataset = Dataset(np.concatenate(xs), np.concatenate(ys).astype(np.int64), labels)
    validate_dataset(dataset, min_per_class=0, min_classes=1)
    return dataset


def load_labelled_split(directory: Path, labels: list[str],
                        holdout_fraction: float) -> tuple[Dataset | None, Dataset | None]:
    """The labelled samples in ``directory`` as (training part, held-out part); None for an empty part.

    A sample id seen in several files counts once (its oldest file). Files written against other class
    names than ``labels`` are refused: their ``y`` would mean other classes.
    """
    train_x, train_y, held_x, held_y = [], [], [], []
    seen: set[str] = set()
    for part in read_labelled_files(directory):
        if part.labels is not None and part.labels != labels:
            raise DataError(f"{part.path} was labelled with classes {part.labels}, but the dataset has {labels}; "
                            "import its labels file again against the current classes or remove the file")
        if part.sample_id is None:
            held_x.append(part.x)
            held_y.append(part.y)
            continue
        first = np.zeros(len(part.y), dtype=bool)
        for row, sample_id in enumerate(part.sample_id.tolist()):
            first[row] = sample_id not in seen
            seen.add(sample_id)
        held = is_held_out(part.sample_id, holdout_fraction)
        train_x.append(part.x[first & ~held])
        train_y.append(part.y[first & ~held])
        held_x.append(part.x[first & held])
        held_y.append(part.y[first & held])
    return _dataset(train_x, train_y, labels), _dataset(held_x, held_y, labels)


def load_labelled(directory: Path, labels: list[str], *,
                  holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> Dataset | None:
    """The held-out labelled samples (an evaluation set never trained on); None when there are none."""
    return load_labelled_split(directory, labels, holdout_fraction)[1]


def labelled_so_far(directory: Path, classes: list[str]) -> tuple[dict[str, int], tuple[int, ...] | None]:
    """The class index of every sample id labelled in ``directory`` (oldest file wins) and its input shape."""
    files = read_labelled_files(directory)
    classes_by_id: dict[str, int] = {}
    for part in files:
        if part.labels is not None and part.labels != classes:
            raise DataError(f"{part.path} was labelled with classes {part.labels}, not {classes}; import against "
                            "the same classes or move the older files away")
        if part.sample_id is not None:
            for sample_id, y in zip(part.sample_id.tolist(), part.y.tolist(), strict=True):
                classes_by_id.setdefault(sample_id, int(y))
    return classes_by_id, (tuple(files[0].x.shape[1:]) if files else None)


def write_labelled(directory: Path, x: np.ndarray, y: np.ndarray, sample_id: list[str], labels: list[str],
                   now: datetime) -> Path:
    """Write one new ``labelled-<UTC time>-<hash>.npz`` atomically; an existing file is never replaced."""
    digest = hashlib.sha256("\n".join(f"{i}\t{c}" for i, c in zip(sample_id, y.tolist(), strict=True)).encode())
    stamp = now.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")
    path = directory / f"labelled-{stamp}-{digest.hexdigest()[:8]}.npz"
    if path.exists():
        raise DataError(f"{path} already exists; labelled files are never replaced (import again in a second)")
    save_arrays(path, x=x.astype(np.float32), y=y.astype(np.int64), sample_id=np.asarray(sample_id, dtype=str),
                labels=np.asarray(labels, dtype=str))
    return path
