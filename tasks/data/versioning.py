"""Data versions: a path inside the repository is added to DVC, pushed, and its ``.dvc`` file committed.

The bundled scikit-learn digits need no tracking (the prepare stage's output is versioned by
``dvc.lock``). For ``npz`` / ``image_folder`` sources inside the repository the raw path is tracked
with ``dvc add``; when its content changed, the data is pushed to the default DVC remote and then the
new ``.dvc`` file is committed, so every model's data version can be pulled again later. The labelled
device samples (``edgeloop labels import``) become data versions the same way (:func:`track_version`).
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import yaml

from tasks.config import DataParams
from tasks.errors import StageError


@dataclass(frozen=True)
class DataVersion:
    path: str | None
    md5: str | None
    new_version: bool
    message: str
    remote: str | None = None  # the DVC remote it was pulled from (data.sync: pull), credentials hidden

    def lineage_tags(self) -> dict[str, str]:
        """MLflow run tags naming the raw data version a run trained on and where it came from."""
        if self.md5 is None:
            return {"edgeloop.data.version": "bundled"}
        return {"edgeloop.data.path": str(self.path), "edgeloop.data.version": self.md5,
                "edgeloop.data.source": f"pulled from {self.remote}" if self.remote else "this host's data.path"}


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


def _require_git_and_dvc(repo: Path) -> None:
    """A clear error, before anything is added, when ``repo`` is not inside a git + DVC repository."""
    root = repo.resolve()
    try:
        inside_git = subprocess.run(["git", "rev-parse", "--show-toplevel"], cwd=root, capture_output=True,
                                    text=True).returncode == 0
    except FileNotFoundError as error:
        raise StageError(f"git is not installed ({error}); data versions are git commits") from error
    if not inside_git:
        raise StageError(f"{root} is not inside a git repository, so no data version can be committed; run "
                         "`git init && dvc init && dvc remote add -d storage URL` there (or point --repo at "
                         "the project)")
    if not any((folder / ".dvc").is_dir() for folder in (root, *root.parents)):
        raise StageError(f"{root} is not inside a DVC repository; run `dvc init` and add a default remote "
                         "(`dvc remote add -d storage URL`) so `dvc push` can keep the data")


def track_version(path: Path, repo: Path, message: str) -> DataVersion:
    """Track ``path`` with DVC; when its content is new, push it and commit its ``.dvc`` file.

    Args:
        path: file or folder inside ``repo`` (relative paths are taken from ``repo``).
        repo: the git + DVC repository; its default DVC remote receives the data.
        message: start of the commit subject; ``": <path> version <md5>"`` is appended.

    Returns:
        The version; ``new_version`` is False when the content was already committed (nothing done).
    """
    absolute = (repo / path).resolve() if not path.is_absolute() else path.resolve()
    try:
        relative = absolute.relative_to(repo.resolve())
    except ValueError:
        raise StageError(f"{path} is outside the repository {repo.resolve()}; move it inside "
                         "so DVC can version it") from None
    if not absolute.exists():
        raise StageError(f"{path} does not exist")
    _require_git_and_dvc(repo)
    _run([_dvc(), "add", str(relative)], repo)
    dvc_file = relative.with_name(relative.name + ".dvc")
    ignore_file = relative.parent / ".gitignore"
    md5 = yaml.safe_load((repo / dvc_file).read_text())["outs"][0]["md5"]
    changed = _run(["git", "status", "--porcelain", "--", str(dvc_file), str(ignore_file)], repo)
    if not changed.strip():
        return DataVersion(str(relative), md5, False, f"{relative} unchanged (version {md5})")
    # push first: a version is committed only once its data is safe on the remote, and a failed push is
    # retried by the next run (the .dvc file is still uncommitted then)
    try:
        _run([_dvc(), "push", str(dvc_file)], repo)
    except StageError as error:
        raise StageError(f"{error}\nnothing was committed; if no default remote is set, add one "
                         "(`dvc remote add -d storage URL`), then run again") from None
    _run(["git", "add", str(dvc_file), str(ignore_file)], repo)
    _run(["git", "commit", "-m", f"{message}: {relative} version {md5}", "--", str(dvc_file), str(ignore_file)],
         repo)
    return DataVersion(str(relative), md5, True, f"new data version {md5} of {relative}: committed and pushed")


def _default_remote(repo: Path) -> str:
    """The default DVC remote's URL, its password (if any) hidden; a clear error when none is set."""
    name = subprocess.run([_dvc(), "remote", "default"], cwd=repo, capture_output=True, text=True).stdout.strip()
    if not name:
        raise StageError(f"no default DVC remote in {repo.resolve()}: `dvc remote add -d storage URL` (with "
                         "`--local` options for this host's credentials)")
    url = _run([_dvc(), "config", f"remote.{name}.url"], repo).strip()
    parts = urlsplit(url)
    if parts.password:
        url = urlunsplit(parts._replace(netloc=f"{parts.username}:***@{parts.hostname}"
                                               f"{f':{parts.port}' if parts.port else ''}"))
    return f"{name} ({url})"


def pull_version(path: Path, repo: Path) -> DataVersion:
    """The version of ``path`` committed in git (its ``.dvc`` file), fetched from the default DVC remote and then
    checked out over whatever is there. Nothing is checked out unless the whole version was fetched: a wrong
    remote, wrong credentials or a missing object leave ``path`` as it was."""
    relative = path.relative_to(repo.resolve()) if path.is_absolute() else path
    dvc_file = repo / relative.with_name(relative.name + ".dvc")
    if not dvc_file.is_file():
        raise StageError(f"data.sync is pull, but {relative}.dvc is not in this checkout: push the data version from "
                         "the host that has the data (data.sync: push) and bring its commit here (git pull)")
    _require_git_and_dvc(repo)
    md5 = yaml.safe_load(dvc_file.read_text())["outs"][0]["md5"]
    remote = _default_remote(repo)
    target = str(dvc_file.relative_to(repo))
    try:
        _run([_dvc(), "fetch", target], repo)
        if "not in cache" in _run([_dvc(), "status", "--json", target], repo):  # a remote that does not hold it
            raise StageError(f"the remote does not hold {md5} (fetched nothing; wrong URL or path?)")
    except StageError as error:
        lines = str(error).strip().splitlines()
        reason = next((line.split("ERROR:", 1)[1].strip() for line in lines if "ERROR:" in line), lines[-1])
        raise StageError(f"could not fetch data version {md5} of {relative} from DVC remote {remote}: {reason}\n"
                         f"check the remote's URL and this host's credentials (`dvc remote modify --local ...`); "
                         f"nothing was checked out, {relative} is as it was") from None
    _run([_dvc(), "checkout", "--force", target], repo)
    return DataVersion(str(relative), md5, False, f"{relative} version {md5} pulled from {remote}", remote)


def check_data_version(data: DataParams, repo: Path = Path(".")) -> DataVersion:
    """``data.sync: push``: track ``data.path`` with DVC, commit and push when its content is new. ``pull``: take
    the version committed in git from the DVC remote (:func:`pull_version`)."""
    if data.source == "sklearn_digits":
        return DataVersion(None, None, False, "bundled scikit-learn digits: nothing to add")
    raw = Path(data.path)
    absolute = (repo / raw).resolve() if not raw.is_absolute() else raw
    try:
        absolute.relative_to(repo.resolve())
    except ValueError:
        raise StageError(f"data.path {raw} is outside the repository {repo.resolve()}; move it inside "
                         "so DVC can version it") from None
    if data.sync == "pull":
        return pull_version(absolute.relative_to(repo.resolve()), repo)
    if not absolute.exists():
        raise StageError(f"data.path {raw} does not exist")
    return track_version(absolute, repo, "data")
