"""A registered model version without training: what the stages before register leave, with a real model file."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from edge.runtime import EdgeModel
from edge.sidecar import write_sidecar
from tasks.contracts import (
    BaselineSummary,
    Dataset,
    Evaluation,
    PreparedData,
    PtqCheck,
    QatSummary,
    QualityFloor,
    TrainSummary,
    VariantRow,
    Workspace,
    write_evaluation,
    write_prepared,
)
from tasks.lineage import directory_md5

TRAIN, TEST, NEWER_TEST = slice(0, 1000), slice(1200, 1500), slice(1400, 1797)


@contextmanager
def sqlite_tracking(root: Path) -> Iterator[str]:
    """MLflow on a SQLite store in ``root`` (``MLFLOW_TRACKING_URI``) while it lasts; the URI as it was after.

    Entered after the session's ``stack``, it saves and puts back the URI the stack set (entered first, it would
    remove it for every later test of the worker)."""
    import mlflow

    saved = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri = f"sqlite:///{root / 'mlflow.db'}"
    try:
        yield uri
    finally:
        mlflow.set_tracking_uri(None)
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def split(digits, rows: slice) -> Dataset:
    return Dataset(digits.x[rows], digits.y[rows], digits.labels)


def _place_variant(workspace: Workspace, digits, model_file, variant: str):
    """``model_file`` as the workspace's ``variant``, with the convert stage's sidecar (a bundle export needs it)."""
    target = workspace.variant_file(variant)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(model_file, target)
    loaded = EdgeModel.load(target)
    write_sidecar(target, {"variant": variant, "runtime": loaded.runtime, "input": asdict(loaded.input),
                           "output": asdict(loaded.output), "data_version": directory_md5(workspace.prepared_dir),
                           "git_commit": "test", "params_hash": "test", "labels": digits.labels})
    return target


def prepare_class_run(workspace: Workspace, digits, files: dict, test_rows: slice) -> tuple[Evaluation, TrainSummary]:
    """:func:`prepare_run` with several variants (the first registered), each passing its gates and fitting every
    device of devices.yaml: without a benchmark, each device class gets the one in its preferred runtime."""
    from tasks.devices import load_devices

    (first, first_file), *_ = files.items()
    _, summary = prepare_run(workspace, digits, first_file, first, test_rows)
    fits = {device.name: "fit" for device in load_devices().devices}
    rows = []
    for variant, model_file in files.items():
        target = _place_variant(workspace, digits, model_file, variant)
        rows.append(VariantRow(variant=variant, status="ok", runtime=EdgeModel.load(target).runtime, accuracy=0.9,
                               accuracy_drop_pts=0.1, size_bytes=target.stat().st_size, gates_passed=True,
                               devices=fits))
    evaluation = Evaluation(recommended=first, recommend_by="size", gates={}, rows=rows)
    write_evaluation(workspace, evaluation)
    return evaluation, summary


def prepare_run(workspace: Workspace, digits, model_file, variant: str, test_rows: slice) -> tuple[Evaluation,
                                                                                                  TrainSummary]:
    """What the stages before register leave in a workspace, with a real tiny model as the variant."""
    write_prepared(workspace, PreparedData(split(digits, TRAIN), split(digits, slice(1000, 1200)),
                                           split(digits, test_rows), digits.x[:50]), "sklearn_digits")
    target = _place_variant(workspace, digits, model_file, variant)
    evaluation = Evaluation(recommended=variant, recommend_by="size", gates={}, rows=[VariantRow(
        variant=variant, status="ok", accuracy=0.9, accuracy_drop_pts=0.1, size_bytes=target.stat().st_size)])
    write_evaluation(workspace, evaluation)
    for suffix in ("csv", "md", "png"):
        workspace.comparison_file(suffix).write_text("report")
    summary = TrainSummary(model="digits_cnn", params_count=1, input_shape=list(digits.input_shape),
                           labels=digits.labels, quality=QualityFloor(val_accuracy=0.9, majority_rate=0.1, floor=0.3),
                           baseline=BaselineSummary(file="baseline.h5", val_accuracy=0.9, test_accuracy=0.9),
                           ptq_check=PtqCheck(val_accuracy=0.9, drop_pts=0.0), qat=QatSummary(reason="off"))
    return evaluation, summary
