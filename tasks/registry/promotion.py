"""Promotion of a registered model version to ``champion``, only with a human approval record.

There is deliberately no bypass: :func:`promote` refuses without an approving record that names a
reviewer. Approving moves alias ``champion`` to the new version, gives the old champion the alias
``previous`` and writes reviewer, comment and time as model-version tags (the audit trail).

What a version carries besides its model is read back here too: the register stage logs, in the run
that registered it, the version's drift reference (:data:`~tasks.monitoring.reference.REFERENCE_ARTIFACT`)
and its frozen test set (the test split it was evaluated on, md5 in the version tag
:data:`FROZEN_TEST_SET_TAG`). The champion's frozen test set is the yardstick of every challenger.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge.runtime import RUNTIME_BY_SUFFIX
from tasks.contracts import Dataset
from tasks.errors import PromotionRefused, StageError
from tasks.lineage import file_md5, utc_now
from tasks.monitoring.reference import REFERENCE_ARTIFACT

log = logging.getLogger(__name__)
CHAMPION_ALIAS = "champion"
PREVIOUS_ALIAS = "previous"
FROZEN_TEST_SET_ARTIFACT = "frozen_test_set/test.npz"  # in the registering run: the test split (x, y) as it was
FROZEN_TEST_SET_INFO = "frozen_test_set/info.json"  # beside it: md5, prepared data version, labels, rows
FROZEN_TEST_SET_TAG = "frozen_test_set.md5"  # model version tag: the md5 of that test split file


@dataclass(frozen=True)
class ApprovalRecord:
    approve: bool
    reviewer: str
    comment: str
    decided_at: str

    @classmethod
    def from_decision(cls, approve: bool, reviewer: str, comment: str) -> ApprovalRecord:
        return cls(bool(approve), reviewer.strip(), comment.strip(), utc_now())


def version_by_alias(name: str, alias: str) -> Any | None:
    """The model version an alias points at, or None when the alias (or model) does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.MlflowClient().get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def download_version(version: Any, destination: Path) -> Path:
    """Download a model version's files (model + sidecar) and return the model file's path.

    Works for pyfunc model versions (the file sits under ``artifacts/``) and for older versions whose
    source is a run's artifact folder holding just the file and its sidecar.
    """
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(destination)))
    model_files = [path for path in local.rglob("*")
                   if path.suffix in RUNTIME_BY_SUFFIX and "code" not in path.relative_to(local).parts]
    if len(model_files) != 1:
        raise StageError(f"model version {version.name}/{version.version} at {version.source} holds "
                         f"{len(model_files)} model files; expected exactly one")
    return model_files[0]


def run_artifact(version: Any, artifact_path: str, destination: Path) -> Path | None:
    """Download ``artifact_path`` of the run that registered ``version``; None when that run lacks it."""
    import mlflow

    if not version.run_id:
        return None
    folder = artifact_path.rpartition("/")[0] or None
    if artifact_path not in {item.path for item in mlflow.MlflowClient().list_artifacts(version.run_id, folder)}:
        return None
    return Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact_path,
                                                    dst_path=str(destination)))


def download_drift_reference(registered_model: str, alias: str, destination: Path) -> tuple[str, Path] | None:
    """The drift reference of the version ``alias`` points at: (version, local file); None without such a version.

    Raises :class:`StageError` when that version's run holds no reference (registered before references
    were logged).
    """
    version = version_by_alias(registered_model, alias)
    if version is None:
        return None
    path = run_artifact(version, REFERENCE_ARTIFACT, destination)
    if path is None:
        raise StageError(f"{registered_model} ({alias}) version {version.version} was registered before drift "
                         "references existed; re-register or set drift.reference to a file (its run "
                         f"{version.run_id or '-'} has no {REFERENCE_ARTIFACT})")
    return str(version.version), path


@dataclass(frozen=True)
class FrozenTestSet:
    """The test split a model version was registered with, downloaded and checked against its md5 tag."""

    version: str
    path: Path
    md5: str
    data_version: str
    labels: list[str]

    def dataset(self) -> Dataset:
        with np.load(self.path, allow_pickle=False) as archive:
            return Dataset(archive["x"], archive["y"], self.labels)


def download_frozen_test_set(version: Any, destination: Path) -> FrozenTestSet | None:
    """The frozen test set of ``version``; None for a version registered before frozen test sets existed."""
    md5 = version.tags.get(FROZEN_TEST_SET_TAG)
    if not md5:
        return None
    name = f"{version.name} version {version.version}"
    path = run_artifact(version, FROZEN_TEST_SET_ARTIFACT, destination)
    info_path = run_artifact(version, FROZEN_TEST_SET_INFO, destination)
    if path is None or info_path is None:
        raise StageError(f"{name} is tagged {FROZEN_TEST_SET_TAG}={md5} but its run {version.run_id} lacks "
                         f"{FROZEN_TEST_SET_ARTIFACT} or {FROZEN_TEST_SET_INFO} (deleted artifacts?); restore them "
                         "or register the model again")
    if file_md5(path) != md5:
        raise StageError(f"{name}'s frozen test set {FROZEN_TEST_SET_ARTIFACT} has md5 {file_md5(path)}, its tag "
                         f"{FROZEN_TEST_SET_TAG} says {md5}: the artifact was altered; restore it or register again")
    info = json.loads(info_path.read_text())
    return FrozenTestSet(str(version.version), path, md5, str(info.get("data_version", "unknown")),
                         [str(label) for label in info["labels"]])


def promote(name: str, version: str, approval: ApprovalRecord | None) -> dict[str, Any]:
    """Move ``champion`` to ``version`` given an approving record; return what changed."""
    import mlflow

    if approval is None or not approval.approve:
        raise PromotionRefused(f"refusing to promote {name} version {version}: no approving decision "
                               f"({'rejected by ' + approval.reviewer if approval else 'no approval record'})")
    if not approval.reviewer:
        raise PromotionRefused(f"refusing to promote {name} version {version}: the approval names no reviewer")
    client = mlflow.MlflowClient()
    client.get_model_version(name, version)  # fails clearly when the version does not exist
    old = version_by_alias(name, CHAMPION_ALIAS)
    for key, value in {"approved_by": approval.reviewer, "approval_comment": approval.comment,
                       "approved_at": approval.decided_at}.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHAMPION_ALIAS, version)
    if old is not None and str(old.version) != str(version):
        client.set_registered_model_alias(name, PREVIOUS_ALIAS, old.version)
    log.info("promoted %s version %s to %s (approved by %s)", name, version, CHAMPION_ALIAS, approval.reviewer)
    return {"registered_model": name, "champion": str(version),
            "previous": str(old.version) if old is not None else None, "approved_by": approval.reviewer}
