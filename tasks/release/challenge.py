"""Challenger vs champion for the human approval gate: both registered versions, scored on the same sets.

The sets are the frozen test split and, when present, newly labelled device samples
(``retrain.labelled_dir``); sizes, host latency and device fit are reported side by side.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tasks.config import Params
from tasks.contracts import Registration, Workspace, read_prepared
from tasks.data.labelled import load_labelled
from tasks.devices import DEVICES_FILE, load_devices
from tasks.evaluation.compare import compare, score_model
from tasks.release import promotion
from tasks.release.tracking import configure


def on_device_figures(run_id: str, variant: str) -> dict[str, dict[str, float]]:
    """The benchmark stage's figures of ``variant`` in run ``run_id`` (default configuration), per device."""
    import mlflow

    figures: dict[str, dict[str, float]] = {}
    for key, value in mlflow.MlflowClient().get_run(run_id).data.metrics.items():
        device, _, rest = key.removeprefix("device.").partition(f".{variant}.")
        if key.startswith("device.") and rest and "." not in rest:
            figures.setdefault(device, {})[rest] = value
    return figures


def compare_with_champion(params: Params, workspace: Workspace, registration: Registration,
                          devices_path: Path = DEVICES_FILE) -> dict[str, Any]:
    """Download the new version and the current champion, score both on the same sets, side by side."""
    import mlflow

    configure(params.mlflow)
    prepared = read_prepared(workspace)
    datasets = {"frozen test set": prepared.test}
    labelled = load_labelled(params.retrain.labelled_dir, prepared.test.labels)
    if labelled is not None:
        datasets["newly labelled"] = labelled
    inventory = load_devices(devices_path)
    name = registration.registered_model
    with tempfile.TemporaryDirectory(prefix="edgeloop-compare-") as scratch:
        workdir = Path(scratch)
        challenger_file = promotion.download_version(mlflow.MlflowClient().get_model_version(
            name, registration.version), workdir / "challenger")
        challenger = score_model("challenger", registration.version, challenger_file, datasets, inventory,
                                 params.evaluate)
        challenger.on_device = on_device_figures(registration.run_id, challenger.variant)
        champion = None
        champion_version = promotion.version_by_alias(name, promotion.CHAMPION_ALIAS)
        if champion_version is not None:
            champion_file = promotion.download_version(champion_version, workdir / "champion")
            champion = score_model("champion", str(champion_version.version), champion_file, datasets, inventory,
                                   params.evaluate)
            if champion_version.run_id:
                champion.on_device = on_device_figures(champion_version.run_id, champion.variant)
    return compare(challenger, champion)
