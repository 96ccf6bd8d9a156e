"""The ``prepare`` stage: load a dataset, validate it, write seeded stratified splits.

Sources: the handwritten digits bundled with scikit-learn (real data, no download), an ``.npz``
with ``x`` (N, H, W[, C]) and ``y`` (N,) (optional ``labels``), or an image-folder tree with one
folder per class. Everything is checked before training can start.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.config import DataParams
from tasks.lineage import directory_md5

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm"}


class DataError(ValueError):
    """A dataset that cannot be trained on; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """Images as float32 NHWC in [0, 1], integer labels and class names."""

    x: np.ndarray
    y: np.ndarray
    labels: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class PreparedData:
    """The splits every later stage reads."""

    train: Dataset
    val: Dataset
    test: Dataset
    representative: np.ndarray
    drift_reference: Dataset


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


def split_dataset(dataset: Dataset, params: DataParams, seed: int) -> PreparedData:
    """Stratified, seeded train/val/test splits plus calibration and drift-reference samples."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(dataset.y))
    val_share = params.val_fraction / (1.0 - params.test_fraction)
    try:
        rest, test = train_test_split(indices, test_size=params.test_fraction, stratify=dataset.y,
                                      random_state=seed)
        train, val = train_test_split(rest, test_size=val_share, stratify=dataset.y[rest], random_state=seed)
    except ValueError as error:  # too few examples for a stratified split at these fractions
        raise DataError(f"cannot split {len(indices)} examples of {len(dataset.labels)} classes into "
                        f"train/val/test ({error}); add data or change data.val_fraction / data.test_fraction"
                        ) from error
    rng = np.random.default_rng(seed)
    representative = rng.choice(train, size=min(params.representative_samples, len(train)), replace=False)
    drift = rng.choice(train, size=min(params.drift_reference_samples, len(train)), replace=False)

    def subset(idx: np.ndarray) -> Dataset:
        return Dataset(dataset.x[np.sort(idx)], dataset.y[np.sort(idx)], dataset.labels)

    return PreparedData(subset(train), subset(val), subset(test), dataset.x[np.sort(representative)], subset(drift))


def write_prepared(prepared: PreparedData, output_dir: Path, source: str) -> Path:
    """Write the splits as .npz files plus ``dataset.json`` describing them."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name in SPLITS:
        split: Dataset = getattr(prepared, name)
        np.savez_compressed(output_dir / f"{name}.npz", x=split.x, y=split.y)
    np.savez_compressed(output_dir / "representative.npz", x=prepared.representative)
    np.savez_compressed(output_dir / "drift_reference.npz", x=prepared.drift_reference.x, y=prepared.drift_reference.y)
    description = {
        "source": source,
        "labels": prepared.train.labels,
        "input_shape": list(prepared.train.input_shape),
        "num_classes": len(prepared.train.labels),
        "counts": {name: int(len(getattr(prepared, name).y)) for name in SPLITS},
        "representative": int(len(prepared.representative)),
        "drift_reference": int(len(prepared.drift_reference.y)),
    }
    (output_dir / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return output_dir


def load_prepared(output_dir: Path) -> PreparedData:
    """Read what :func:`write_prepared` wrote; a clear error when the prepare stage has not run."""
    description_path = output_dir / "dataset.json"
    if not description_path.is_file():
        raise DataError(f"{output_dir} holds no prepared data; run the prepare stage first (dvc repro prepare)")
    labels = json.loads(description_path.read_text())["labels"]

    def read(name: str) -> Dataset:
        archive = np.load(output_dir / f"{name}.npz")
        return Dataset(archive["x"], archive["y"], labels)

    representative = np.load(output_dir / "representative.npz")["x"]
    return PreparedData(read("train"), read("val"), read("test"), representative, read("drift_reference"))


def prepare(params: DataParams, seed: int) -> tuple[Path, str]:
    """Run the whole stage; return the output folder and its data version (DVC-style md5)."""
    dataset = load_source(params)
    prepared = split_dataset(dataset, params, seed)
    output_dir = write_prepared(prepared, Path(params.output_dir), params.source)
    return output_dir, directory_md5(output_dir)


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_stage

    parser = argparse.ArgumentParser(description="prepare stage: validate data and write splits")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)

    def stage(params):
        output_dir, version = prepare(params.data, params.seed)
        print(f"prepared data in {output_dir} (data version {version})")

    return run_stage(args.params, stage)


if __name__ == "__main__":
    # run the importable module, not __main__, so the error classes raised are the ones tasks.cli catches
    from tasks.data import main as stage_main

    raise SystemExit(stage_main())
