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


def _clone(repo: Path, target: Path) -> Path:
    subprocess.run(["git", "clone", "-q", str(repo), str(target)], check=True, capture_output=True, env=os.environ)
    return target


def test_a_pull_host_trains_on_the_committed_version_and_a_stale_copy_is_replaced(repo, tmp_path):
    np.savez(repo / "data" / "set.npz", x=np.zeros((4, 8, 8)), y=np.arange(4))
    pushed = check_data_version(DataParams(source="npz", path=Path("data/set.npz")), repo)
    worker = _clone(repo, tmp_path / "worker")
    assert not (worker / "data" / "set.npz").exists()  # git carries the .dvc file, not the data
    pulling = DataParams(source="npz", path=Path("data/set.npz"), sync="pull")
    pulled = check_data_version(pulling, worker)
    assert pulled.md5 == pushed.md5 and not pulled.new_version
    assert (worker / "data" / "set.npz").read_bytes() == (repo / "data" / "set.npz").read_bytes()
    assert pulled.lineage_tags() == {"edgeloop.data.path": "data/set.npz", "edgeloop.data.version": pushed.md5,
                                     "edgeloop.data.source": f"pulled from local ({repo / 'remote'})"}
    np.savez(worker / "data" / "set.npz", x=np.ones((4, 8, 8)), y=np.arange(4))  # a stale or edited copy
    commits = _commits(worker)
    assert check_data_version(pulling, worker).md5 == pushed.md5
    assert (worker / "data" / "set.npz").read_bytes() == (repo / "data" / "set.npz").read_bytes()
    assert _commits(worker) == commits  # a pull host never adds or commits a version


def test_a_pull_from_an_unreachable_remote_names_it_and_leaves_the_data_alone(repo, tmp_path):
    np.savez(repo / "data" / "set.npz", x=np.zeros((4, 8, 8)), y=np.arange(4))
    check_data_version(DataParams(source="npz", path=Path("data/set.npz")), repo)
    worker = _clone(repo, tmp_path / "worker")
    subprocess.run([DVC, "remote", "modify", "--local", "local", "url", str(tmp_path / "elsewhere")], cwd=worker,
                   check=True)
    with pytest.raises(StageError, match=r"(?s)from DVC remote local \(.*elsewhere\).*nothing was checked out"):
        check_data_version(DataParams(source="npz", path=Path("data/set.npz"), sync="pull"), worker)
    assert not (worker / "data" / "set.npz").exists()
    (worker / "data" / "set.npz.dvc").unlink()
    with pytest.raises(StageError, match="set.npz.dvc is not in this checkout"):
        check_data_version(DataParams(source="npz", path=Path("data/set.npz"), sync="pull"), worker)


def test_a_remote_password_is_never_shown(repo):
    subprocess.run([DVC, "remote", "add", "-d", "-f", "team", "ssh://ops:s3cret@storage.lan:2222/srv/dvc"], cwd=repo,
                   check=True)
    from tasks.data.versioning import _default_remote

    assert _default_remote(repo) == "team (ssh://ops:***@storage.lan:2222/srv/dvc)"
