"""The ``prepare`` stage: load a dataset, validate it, write seeded stratified splits.

The newest data version is the source plus the training part of the labelled device samples
(``retrain.labelled_dir``, :mod:`tasks.data.labelled`): they join the train split only, after the
source's stratified split, so validation and test stay the source's and test results stay comparable
from one data version to the next.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from tasks.config import DataParams, Params
from tasks.contracts import Dataset, DatasetInfo, PreparedData, Workspace, write_prepared
from tasks.data.labelled import DEFAULT_HOLDOUT_FRACTION, load_labelled_split
from tasks.data.sources import load_source
from tasks.entrypoint import run_stage, stage_arguments
from tasks.errors import DataError
from tasks.lineage import directory_md5

LOGGER = logging.getLogger(__name__)


def split_dataset(dataset: Dataset, params: DataParams, seed: int) -> PreparedData:
    """Stratified, seeded train/val/test splits plus the calibration (representative) samples."""
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

    def subset(idx: np.ndarray) -> Dataset:
        return Dataset(dataset.x[np.sort(idx)], dataset.y[np.sort(idx)], dataset.labels)

    return PreparedData(subset(train), subset(val), subset(test), dataset.x[np.sort(representative)])


def add_to_train(prepared: PreparedData, labelled: Dataset) -> PreparedData:
    """``labelled`` appended to the train split; validation, test and calibration samples stay as they are."""
    train = prepared.train
    if labelled.input_shape != train.input_shape:
        raise DataError(f"labelled samples have input shape {list(labelled.input_shape)}, the source data "
                        f"{list(train.input_shape)}; label samples of a model trained on this data")
    if labelled.labels != train.labels:
        raise DataError(f"labelled samples use classes {labelled.labels}, the source data {train.labels}")
    merged = Dataset(np.concatenate([train.x, labelled.x.astype(train.x.dtype)]),
                     np.concatenate([train.y, labelled.y.astype(train.y.dtype)]), train.labels)
    return PreparedData(merged, prepared.val, prepared.test, prepared.representative)


def prepare(params: DataParams, seed: int, workspace: Workspace, labelled_dir: Path | None = None,
            holdout_fraction: float = DEFAULT_HOLDOUT_FRACTION) -> tuple[DatasetInfo, str]:
    """Run the whole stage; return what was written and its data version (DVC-style md5).

    Args:
        labelled_dir: ``retrain.labelled_dir``; its training part joins the train split (None: source only).
        holdout_fraction: ``retrain.labelled_holdout_fraction``: the share of labelled samples held out.
    """
    dataset = load_source(params)
    prepared = split_dataset(dataset, params, seed)
    if labelled_dir is not None:
        train_part, held_out = load_labelled_split(labelled_dir, dataset.labels, holdout_fraction)
        if train_part is not None:
            prepared = add_to_train(prepared, train_part)
        if train_part is not None or held_out is not None:
            LOGGER.info("labelled samples in %s: %d added to the train split, %d held out for evaluation",
                        labelled_dir, len(train_part.y) if train_part else 0, len(held_out.y) if held_out else 0)
    info = write_prepared(workspace, prepared, params.source)
    return info, directory_md5(workspace.prepared_dir)


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop prepare", description="prepare stage: validate data and write splits"))
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        info, version = prepare(params.data, params.seed, workspace, params.retrain.labelled_dir,
                                params.retrain.labelled_holdout_fraction)
        print(f"prepared {info.counts} in {workspace.prepared_dir} (data version {version})")

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
