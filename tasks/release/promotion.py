"""Promotion of a registered model version to ``champion``, only with a human approval record.

There is deliberately no bypass: :func:`promote` refuses without an approving record that names a
reviewer. Approving moves alias ``champion`` to the new version, gives the old champion the alias
``previous`` and writes reviewer, comment and time as model-version tags (the audit trail).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.runtime import RUNTIME_BY_SUFFIX
from tasks.errors import PromotionRefused, StageError
from tasks.lineage import utc_now

log = logging.getLogger(__name__)
CHAMPION_ALIAS = "champion"
PREVIOUS_ALIAS = "previous"


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
