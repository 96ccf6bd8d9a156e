"""The ``prepare`` stage: load a dataset, validate it, write seeded stratified splits."""

from __future__ import annotations

import argparse
import numpy as np

from tasks.config import DataParams, Params
from tasks.contracts import Dataset, DatasetInfo, PreparedData, Workspace, write_prepared
from tasks.data.sources import load_source
from tasks.entrypoint import run_stage, stage_arguments
from tasks.errors import DataError
from tasks.lineage import directory_md5


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


def prepare(params: DataParams, seed: int, workspace: Workspace) -> tuple[DatasetInfo, str]:
    """Run the whole stage; return what was written and its data version (DVC-style md5)."""
    dataset = load_source(params)
    info = write_prepared(workspace, split_dataset(dataset, params, seed), params.source)
    return info, directory_md5(workspace.prepared_dir)


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop prepare", description="prepare stage: validate data and write splits"))
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        info, version = prepare(params.data, params.seed, workspace)
        print(f"prepared {info.counts} in {workspace.prepared_dir} (data version {version})")

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
