"""Data version check with real git and real DVC in a scratch repository."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.config import DataParams
from tasks.data.versioning import check_data_version
from tasks.errors import StageError

DVC = str(Path(sys.executable).with_name("dvc"))
GIT_ENV = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@edgeloop.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@edgeloop.invalid"}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    remote = str(tmp_path / "remote")
    for args in (["git", "init", "-q"], [DVC, "init", "-q"], [DVC, "remote", "add", "-d", "local", remote],
                 ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=tmp_path, check=True, capture_output=True, env=os.environ)
    (tmp_path / "data").mkdir()
    return tmp_path


def _commits(repo: Path) -> int:
    return int(subprocess.run(["git", "rev-list", "--count", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout)


def test_new_data_is_added_committed_and_pushed_once(repo):
    np.savez(repo / "data" / "set.npz", x=np.zeros((4, 8, 8)), y=np.arange(4))
    params = DataParams(source="npz", path=Path("data/set.npz"))
    first = check_data_version(params, repo)
    assert first.new_version and first.md5
    assert _commits(repo) == 2 and (repo / "data" / "set.npz.dvc").is_file()
    assert any((repo / "remote").rglob("*")), "pushed to the DVC remote"
    again = check_data_version(params, repo)
    assert not again.new_version and again.md5 == first.md5 and _commits(repo) == 2
    np.savez(repo / "data" / "set.npz", x=np.ones((4, 8, 8)), y=np.arange(4))
    changed = check_data_version(params, repo)
    assert changed.new_version and changed.md5 != first.md5 and _commits(repo) == 3


def test_bundled_data_needs_nothing(repo):
    assert not check_data_version(DataParams(), repo).new_version


def test_missing_remote_fails_with_the_dvc_error(repo):
    subprocess.run([DVC, "remote", "remove", "local"], cwd=repo, check=True)
    (repo / "data" / "set.npz").write_bytes(b"abc")
    commits = _commits(repo)
    with pytest.raises(StageError, match="dvc push"):
        check_data_version(DataParams(source="npz", path=Path("data/set.npz")), repo)
    assert _commits(repo) == commits  # nothing committed that the remote does not hold


def test_paths_outside_the_repo_are_refused(repo, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "d.npz"
    outside.write_bytes(b"x")
    with pytest.raises(StageError, match="outside the repository"):
        check_data_version(DataParams(source="npz", path=outside), repo)
