"""Dataset sources: the bundled digits, an ``.npz`` or an image-folder tree, validated before use.

Sources: the handwritten digits bundled with scikit-learn (real data, no download), an ``.npz``
with ``x`` (N, H, W[, C]) and ``y`` (N,) (optional ``labels``), or an image-folder tree with one
folder per class. Everything is checked before training can start.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tasks.config import DataParams
from tasks.contracts import Dataset
from tasks.errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm"}


def load_sklearn_digits() -> Dataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images.astype(np.float32) / 16.0)[..., np.newaxis]
    return Dataset(x, digits.target.astype(np.int64), [str(i) for i in range(10)])


def load_npz(path: Path) -> Dataset:
    if not path.is_file():
        raise DataError(f"data.path {path} not found; point it at an .npz with arrays 'x' and 'y'")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise DataError(f"{path} is not a readable .npz archive ({error})") from error
    missing = {"x", "y"} - set(archive.files)
    if missing:
        raise DataError(f"{path} lacks array(s) {sorted(missing)}; it has {sorted(archive.files)}")
    try:
        x, y = archive["x"].astype(np.float32), archive["y"]
        labels = [str(v) for v in archive["labels"]] if "labels" in archive.files else None
    except (ValueError, TypeError) as error:  # object arrays (pickles) or non-numeric images
        raise DataError(f"{path}: arrays must be plain numeric (no pickled objects): {error}") from error
    if x.ndim == 3:
        x = x[..., np.newaxis]
    if x.ndim != 4:
        raise DataError(f"{path}: x has shape {archive['x'].shape}; expected (N, H, W) or (N, H, W, C)")
    finite = x[np.isfinite(x)]
    peak = float(finite.max()) if finite.size else 0.0
    if peak > 1.0:  # 8-bit images (0..255) or the digits' 0..16 scale
        x = x / 255.0 if peak > 16.0 else x / 16.0
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{path}: y has dtype {y.dtype}; labels must be integers 0..K-1")
    num_classes = len(labels) if labels else int(y.max()) + 1 if y.size else 0
    return Dataset(x, y.astype(np.int64), labels or [str(i) for i in range(num_classes)])


def load_image_folder(root: Path, image_size: tuple[int, int], color_mode: str) -> Dataset:
    from PIL import Image, UnidentifiedImageError

    if not root.is_dir():
        raise DataError(f"data.path {root} is not a directory; expected one sub-folder of images per class")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    images, targets = [], []
    for label_index, class_dir in enumerate(class_dirs):
        for file in sorted(f for f in class_dir.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES):
            try:
                with Image.open(file) as image:
                    converted = image.convert("L" if color_mode == "grayscale" else "RGB")
                    resized = converted.resize((image_size[1], image_size[0]))
            except (UnidentifiedImageError, OSError) as error:
                raise DataError(f"{file} is not a readable image ({error}); remove or replace it") from error
            array = np.asarray(resized, dtype=np.float32) / 255.0
            images.append(array[..., np.newaxis] if array.ndim == 2 else array)
            targets.append(label_index)
    if not images:
        raise DataError(f"{root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in class sub-folders")
    return Dataset(np.stack(images), np.asarray(targets, np.int64), [d.name for d in class_dirs])


def load_source(params: DataParams) -> Dataset:
    """Load the dataset ``params.source`` names and validate it."""
    if params.source == "sklearn_digits":
        dataset = load_sklearn_digits()
    elif params.source == "npz":
        dataset = load_npz(Path(params.path))
    else:
        dataset = load_image_folder(Path(params.path), params.image_size, params.color_mode)
    validate_dataset(dataset)
    return dataset


def validate_dataset(dataset: Dataset, min_per_class: int = 4, min_classes: int = 2) -> None:
    """Raise :class:`DataError` for data no model should be trained on."""
    x, y = dataset.x, dataset.y
    if x.ndim != 4 or x.shape[0] == 0:
        raise DataError(f"images must be a non-empty (N, H, W, C) array, got shape {x.shape}")
    if y.shape != (x.shape[0],):
        raise DataError(f"labels have shape {y.shape}; expected ({x.shape[0]},), one label per image")
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).reshape(len(x), -1).any(axis=1).sum())
        raise DataError(f"{bad} image(s) contain NaN or infinite values; clean or drop them")
    num_classes = len(dataset.labels)
    if y.min() < 0 or y.max() >= num_classes:
        raise DataError(f"labels range {int(y.min())}..{int(y.max())} is outside 0..{num_classes - 1}")
    counts = np.bincount(y, minlength=num_classes)
    if np.count_nonzero(counts) < min_classes:
        raise DataError(f"only one class present (label {int(y[0])}); a classifier needs at least two")
    if counts.min() < min_per_class:
        sparse = [dataset.labels[i] for i in np.flatnonzero(counts < min_per_class)]
        raise DataError(f"class(es) {sparse} have fewer than {min_per_class} examples; stratified splits need more")
