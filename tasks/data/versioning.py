"""Data version check for scheduled runs: new raw data is added to DVC, committed and pushed.

The bundled scikit-learn digits need no tracking (the prepare stage's output is versioned by
``dvc.lock``). For ``npz`` / ``image_folder`` sources inside the repository the raw path is tracked
with ``dvc add``; when its content changed, the new ``.dvc`` file is committed and pushed to the
default DVC remote, so every model's data version can be pulled again later.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from tasks.errors import StageError
from tasks.config import DataParams


@dataclass(frozen=True)
class DataVersion:
    path: str | None
    md5: str | None
    new_version: bool
    message: str


def _run(args: list[str], repo: Path) -> str:
    try:
        completed = subprocess.run(args, cwd=repo, capture_output=True, text=True, timeout=600)
    except FileNotFoundError as error:
        raise StageError(f"{args[0]} is not installed ({error})") from error
    if completed.returncode != 0:
        detail = (completed.stderr or completed.stdout).strip()[-800:]
        raise StageError(f"`{' '.join(args)}` failed in {repo}: {detail}")
    return completed.stdout


def _dvc() -> str:
    return str(Path(sys.executable).with_name("dvc"))


def check_data_version(data: DataParams, repo: Path = Path(".")) -> DataVersion:
    """Track ``data.path`` with DVC; commit and push when its content is new."""
    if data.source == "sklearn_digits":
        return DataVersion(None, None, False, "bundled scikit-learn digits: nothing to add")
    raw = Path(data.path)
    absolute = (repo / raw).resolve() if not raw.is_absolute() else raw
    try:
        relative = absolute.relative_to(repo.resolve())
    except ValueError:
        raise StageError(f"data.path {raw} is outside the repository {repo.resolve()}; move it inside "
                         "so DVC can version it") from None
    if not absolute.exists():
        raise StageError(f"data.path {raw} does not exist")
    _run([_dvc(), "add", str(relative)], repo)
    dvc_file = relative.with_name(relative.name + ".dvc")
    md5 = yaml.safe_load((repo / dvc_file).read_text())["outs"][0]["md5"]
    changed = _run(["git", "status", "--porcelain", "--", str(dvc_file), str(relative.parent / ".gitignore")], repo)
    if not changed.strip():
        return DataVersion(str(relative), md5, False, f"{relative} unchanged (version {md5})")
    # push first: a version is committed only once its data is safe on the remote, and a failed push is
    # retried by the next run (the .dvc file is still uncommitted then)
    _run([_dvc(), "push", str(dvc_file)], repo)
    _run(["git", "add", str(dvc_file), str(relative.parent / ".gitignore")], repo)
    _run(["git", "commit", "-m", f"data: {relative} version {md5}", "--", str(dvc_file),
          str(relative.parent / ".gitignore")], repo)
    return DataVersion(str(relative), md5, True, f"new data version {md5} of {relative}: committed and pushed")
