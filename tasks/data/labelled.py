"""Newly labelled device samples (``retrain.labelled_dir``): one extra evaluation set for the retrain."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.contracts import Dataset
from tasks.data.sources import load_npz, validate_dataset
from tasks.errors import DataError


def load_labelled(directory: Path, labels: list[str]) -> Dataset | None:
    """All ``.npz`` files (``x``, ``y``) in ``directory`` as one dataset; None when there are none."""
    files = sorted(directory.glob("*.npz")) if directory.is_dir() else []
    if not files:
        return None
    parts = [load_npz(path) for path in files]
    shapes = {part.x.shape[1:] for part in parts}
    if len(shapes) != 1:
        raise DataError(f"labelled files in {directory} have different image shapes {sorted(shapes)}")
    dataset = Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]), labels)
    validate_dataset(dataset, min_per_class=0, min_classes=1)
    return dataset
