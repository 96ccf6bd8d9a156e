"""Challenger vs champion for the human approval gate: both registered versions, scored on the same sets.

The sets: the champion's frozen test set (the test split it was registered with, from its MLflow run),
this run's test split when it differs from that one, and the newly labelled held-out device samples
(``retrain.labelled_dir``) when present. Accuracy overall and per class, sizes, host latency and device
fit are reported side by side; a challenger losing more than ``retrain.max_frozen_drop_pts`` on the
frozen test set is flagged.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.contracts import Dataset, Registration, Workspace, read_prepared
from tasks.data.labelled import load_labelled
from tasks.devices import DEVICES_FILE, load_devices
from tasks.evaluation.compare import CURRENT_SET, FROZEN_SET, LABELLED_SET, compare, score_model
from tasks.lineage import file_md5
from tasks.registry import promotion
from tasks.registry.device_choice import DeviceChoice, choices_markdown
from tasks.registry.tracking import configure


def on_device_figures(run_id: str, variant: str) -> dict[str, dict[str, float]]:
    """The benchmark stage's figures of ``variant`` in run ``run_id`` (default configuration), per device."""
    import mlflow

    figures: dict[str, dict[str, float]] = {}
    for key, value in mlflow.MlflowClient().get_run(run_id).data.metrics.items():
        device, _, rest = key.removeprefix("device.").partition(f".{variant}.")
        if key.startswith("device.") and rest and "." not in rest:
            figures.setdefault(device, {})[rest] = value
    return figures


def evaluation_sets(workspace: Workspace, current: Dataset, registration: Registration, champion: Any | None,
                    workdir: Path) -> tuple[dict[str, Dataset], dict[str, str], list[str]]:
    """The frozen test set (the champion's) and, when it differs, ``current`` (this run's test split);
    what each set is; notes for the reviewer.

    Without a champion the frozen test set is this run's split (the one the new version carries); for a
    champion registered before frozen test sets existed it is too, with a note saying so.
    """
    current_md5 = file_md5(workspace.split_file("test"))
    this_split = (f"this run's test split ({len(current.y)} samples, md5 {current_md5}, "
                  f"data {registration.data_version})")
    frozen = promotion.download_frozen_test_set(champion, workdir / "frozen") if champion is not None else None
    if champion is None:
        return {FROZEN_SET: current}, {FROZEN_SET: f"{this_split}: frozen with v{registration.version}"}, []
    if frozen is None:
        return ({FROZEN_SET: current}, {FROZEN_SET: this_split},
                [f"champion v{champion.version} was registered before frozen test sets existed: both models are "
                 "scored on this run's test split instead, which may differ from the data the champion was "
                 "tested on"])
    datasets = {FROZEN_SET: frozen.dataset()}  # scored with the frozen set's own class names
    sets = {FROZEN_SET: f"champion v{frozen.version}'s test split ({len(datasets[FROZEN_SET].y)} samples, "
                        f"md5 {frozen.md5}, data {frozen.data_version})"}
    notes = [] if frozen.labels == current.labels else [
        f"the frozen test set's classes {frozen.labels} differ from this run's {current.labels}"]
    if frozen.md5 != current_md5:
        datasets[CURRENT_SET], sets[CURRENT_SET] = current, this_split
    return datasets, sets, notes


def compare_with_champion(params: Params, workspace: Workspace, registration: Registration,
                          devices_path: Path = DEVICES_FILE) -> dict[str, Any]:
    """Download the new version and the current champion, score both on the same sets, side by side."""
    import mlflow

    configure(params.mlflow)
    inventory = load_devices(devices_path)
    name = registration.registered_model
    with tempfile.TemporaryDirectory(prefix="edgeloop-compare-") as scratch:
        workdir = Path(scratch)
        champion_version = promotion.version_by_alias(name, promotion.CHAMPION_ALIAS)
        current = read_prepared(workspace).test
        datasets, sets, notes = evaluation_sets(workspace, current, registration, champion_version, workdir)
        labelled = load_labelled(params.retrain.labelled_dir, current.labels,  # the share prepare kept out
                                 holdout_fraction=params.retrain.labelled_holdout_fraction)
        if labelled is not None:
            datasets[LABELLED_SET] = labelled
            sets[LABELLED_SET] = f"held-out newly labelled samples from {params.retrain.labelled_dir} " \
                                 f"({len(labelled.y)} samples)"
        challenger_file = promotion.download_version(mlflow.MlflowClient().get_model_version(
            name, registration.version), workdir / "challenger")
        challenger = score_model("challenger", registration.version, challenger_file, datasets, inventory,
                                 params.evaluate)
        challenger.on_device = on_device_figures(registration.run_id, challenger.variant)
        champion = None
        if champion_version is not None:
            champion_file = promotion.download_version(champion_version, workdir / "champion")
            champion = score_model("champion", str(champion_version.version), champion_file, datasets, inventory,
                                   params.evaluate)
            if champion_version.run_id:
                champion.on_device = on_device_figures(champion_version.run_id, champion.variant)
    comparison = compare(challenger, champion, max_frozen_drop_pts=params.retrain.max_frozen_drop_pts, sets=sets,
                         notes=notes)
    choices = release_choices(registration.run_id)
    if choices:
        comparison["release_table"] = choices_markdown(choices)
    return comparison


def release_choices(run_id: str) -> list[DeviceChoice]:
    """The variant per device class the register stage recorded for run ``run_id`` (none for older runs)."""
    import json

    import mlflow

    try:
        path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="release/device_choices.json")
        return [DeviceChoice(**choice) for choice in json.loads(Path(path).read_text())["device_choices"]]
    except (OSError, ValueError, KeyError, TypeError, mlflow.exceptions.MlflowException):
        return []
