"""Labels import: join by sample id, one new labelled file, a DVC data version; the stable holdout split."""

import json
import os
import shutil
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
import yaml

from tasks.config import DataParams
from tasks.contracts import DatasetInfo, Workspace, read_prepared
from tasks.data.labelled import is_held_out, load_labelled, load_labelled_split, write_labelled
from tasks.data.labels import class_index, import_labels, main, read_labels_file
from tasks.data.prepare import prepare
from tasks.errors import DataError
from tasks.monitoring.collected import WINDOWS
from tests.conftest import REPO_ROOT
from tests.unit.test_dataversion import DVC, GIT_ENV, _commits

CLASSES = ["cat", "dog", "bird"]
SHAPE = (4, 4, 1)
NOW = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


def _window(windows: Path, name: str, ids: list[str], raw_ids: list[str]) -> None:
    """A window file as the drift check writes it; ``x`` row of id ``s<k>`` is filled with k / 1000."""
    rows = len(ids)
    arrays = {"sample_id": np.array(ids), "features": np.zeros((rows, 3), np.float32),
              "confidence": np.ones(rows, np.float32), "predicted": np.zeros(rows, np.int32),
              "model_version": np.array(["1"] * rows), "device_id": np.array(["dev-1"] * rows),
              "timestamp": np.arange(rows, dtype=np.float64)}
    if raw_ids:
        arrays["x_sample_id"] = np.array(raw_ids)
        arrays["x"] = np.stack([np.full(SHAPE, int(i[1:]) / 1000, np.float32) for i in raw_ids])
    windows.mkdir(parents=True, exist_ok=True)
    np.savez(windows / f"{name}.npz", **arrays)


def _labels(path: Path, rows: list[tuple[str, str]]) -> Path:
    path.write_text("sample_id,label\n" + "".join(f"{sample_id},{label}\n" for sample_id, label in rows))
    return path


@pytest.fixture
def collected(tmp_path) -> Path:
    """s0..s9 in two windows; s8 and s9 come from a device that keeps no raw input."""
    folder = tmp_path / "collected"
    _window(folder / WINDOWS, "w1", [f"s{k}" for k in range(5)], [f"s{k}" for k in range(5)])
    _window(folder / WINDOWS, "w2", [f"s{k}" for k in range(5, 10)], ["s5", "s6", "s7"])
    return folder


def test_import_joins_raw_inputs_by_sample_id(tmp_path, collected):
    labels = _labels(tmp_path / "labels.csv", [("s3", "dog"), ("s6", "2"), ("s0", "cat")])
    result = import_labels(labels, collected, tmp_path / "labelled", CLASSES, SHAPE, NOW)
    assert result.imported == ["s3", "s6", "s0"] and not result.rejected
    assert result.written.name.startswith("labelled-20250301T120000Z-")
    with np.load(result.written) as archive:
        assert archive["sample_id"].tolist() == ["s3", "s6", "s0"]
        assert archive["y"].tolist() == [1, 2, 0]
        assert archive["x"].dtype == np.float32 and archive["x"].shape == (3, *SHAPE)
        assert np.allclose(archive["x"][:, 0, 0, 0], [0.003, 0.006, 0.0])
        assert archive["labels"].tolist() == CLASSES


def test_unknown_ids_and_samples_without_raw_input_are_reported_and_skipped(tmp_path, collected):
    labels = _labels(tmp_path / "labels.csv", [("s1", "cat"), ("s8", "dog"), ("s9", "dog"), ("nope", "cat"),
                                               ("s2", "horse"), ("", "cat")])
    result = import_labels(labels, collected, tmp_path / "labelled", CLASSES, SHAPE, NOW)
    assert result.imported == ["s1"]
    assert result.without_raw == ["s8", "s9"] and result.unknown == ["nope"]
    assert len(result.rejected) == 2 and any("'horse' is not a class name" in reason for reason in result.rejected)
    report = result.report()
    assert "no raw input kept by the device, skipped: 2 (s8, s9)" in report
    assert "in no window file, skipped: 1 (nope)" in report and "rejected rows: 2" in report


@pytest.mark.parametrize(("name", "content"), [
    ("labels.csv", "sample_id,label\ns1,cat\ns2,dog\ns1,bird\n"),
    ("labels.json", '{"s1": "cat", "s2": "dog", "s1": "bird"}'),
    ("labels.jsonl", '{"sample_id": "s1", "label": 0}\n{"sample_id": "s1", "label": 2}\n'),
])
def test_conflicting_duplicate_labels_refuse_the_file(tmp_path, collected, name, content):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match="s1.*two different labels|two different labels.*s1"):
        import_labels(tmp_path / name, collected, tmp_path / "labelled", CLASSES, SHAPE, NOW)
    assert not (tmp_path / "labelled").exists()


def test_labels_file_formats_agree(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"sample_id": "s1", "label": "dog"}, {"sample_id": "s2", "label": 2}]))
    (tmp_path / "b.jsonl").write_text('{"s1": "dog"}\n\n{"sample_id": "s2", "label": 2}\n'
                                      '{"sample_id": "s1", "label": "dog"}\n')
    _labels(tmp_path / "c.csv", [("s1", "dog"), ("s2", "2")])
    parsed = [read_labels_file(tmp_path / name)[0] for name in ("a.json", "b.jsonl", "c.csv")]
    assert [{key: class_index(label, CLASSES) for key, (label, _) in rows.items()} for rows in parsed] == \
        [{"s1": 1, "s2": 2}] * 3


@pytest.mark.parametrize(("label", "index"), [("dog", 1), ("0", 0), (2, 2), ("3", None), (3, None), (True, None),
                                              ("Dog", None), (1.0, None)])
def test_class_names_first_then_indexes(label, index):
    assert class_index(label, CLASSES) == index


def test_class_names_win_over_indexes():
    assert class_index("1", ["2", "1", "0"]) == 1


def test_nothing_joinable_writes_nothing(tmp_path, collected):
    labels = _labels(tmp_path / "labels.csv", [("s8", "cat"), ("missing", "dog")])
    result = import_labels(labels, collected, tmp_path / "labelled", CLASSES, SHAPE, NOW)
    assert result.written is None and not (tmp_path / "labelled").exists()


def test_raw_inputs_of_another_shape_are_refused(tmp_path, collected):
    labels = _labels(tmp_path / "labels.csv", [("s1", "cat")])
    with pytest.raises(DataError, match="shape"):
        import_labels(labels, collected, tmp_path / "labelled", CLASSES, (8, 8, 1), NOW)
    assert not (tmp_path / "labelled").exists()


# ---- the CLI in a real git + DVC repository ----------------------------------------------------------
@pytest.fixture(scope="module")
def initialised(tmp_path_factory) -> Path:
    """git init + dvc init + first commit, once per module (dvc is slow to start); tests copy it."""
    template = tmp_path_factory.mktemp("template")
    for args in (["git", "init", "-q"], [DVC, "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "init"]):
        subprocess.run(args, cwd=template, check=True, capture_output=True, env={**os.environ, **GIT_ENV})
    return template


def _set_remote(project: Path, remote: Path) -> None:
    """What `dvc remote add -d local REMOTE` writes (without starting dvc)."""
    with (project / ".dvc" / "config").open("a") as config:
        config.write(f"[core]\n    remote = local\n['remote \"local\"']\n    url = {remote}\n")


def _params(folder: Path, collected_dir: Path) -> None:
    (folder / "params.yaml").write_text(yaml.safe_dump({"retrain": {"labelled_dir": "data/labelled"},
                                                        "drift": {"collected_dir": str(collected_dir)}}))


@pytest.fixture
def repo(tmp_path, monkeypatch, collected, initialised):
    """A copy of the initialised repository with a local remote, params.yaml and a prepared dataset.json."""
    project = tmp_path / "project"
    shutil.copytree(initialised, project)
    for key, value in GIT_ENV.items():
        monkeypatch.setenv(key, value)
    _set_remote(project, tmp_path / "remote")
    _params(project, collected)
    workspace = Workspace(project)
    workspace.prepared_dir.mkdir(parents=True)
    workspace.dataset_file.write_text(DatasetInfo(source="npz", labels=CLASSES, input_shape=list(SHAPE),
                                                  num_classes=3, counts={}, representative=0).model_dump_json())
    monkeypatch.chdir(project)
    return project


def _tracked(repo: Path) -> list[str]:
    return subprocess.run(["git", "ls-files"], cwd=repo, capture_output=True, text=True, check=True).stdout.split()


def test_import_commits_a_pushed_data_version_once(repo, tmp_path, capsys):
    labels = _labels(tmp_path / "labels.csv", [("s1", "cat"), ("s5", "bird"), ("s8", "dog")])
    assert main(["import", str(labels)]) == 0
    files = sorted((repo / "data" / "labelled").glob("labelled-*.npz"))
    assert len(files) == 1 and _commits(repo) == 2
    assert {"data/labelled.dvc", "data/.gitignore"} <= set(_tracked(repo))
    md5 = yaml.safe_load((repo / "data" / "labelled.dvc").read_text())["outs"][0]["md5"]
    assert (tmp_path / "remote" / "files" / "md5" / md5[:2] / md5[2:]).is_file(), "the version is on the remote"
    out = capsys.readouterr().out
    assert "imported: 2" in out and "no raw input kept by the device, skipped: 1 (s8)" in out
    assert main(["import", str(labels)]) == 0  # the same labels again: nothing new
    assert sorted((repo / "data" / "labelled").glob("*.npz")) == files and _commits(repo) == 2
    assert "already labelled, skipped: 2" in capsys.readouterr().out


def test_without_a_remote_the_file_stays_and_a_rerun_commits_it(repo, tmp_path, capsys):
    (repo / ".dvc" / "config").write_text("")
    labels = _labels(tmp_path / "labels.csv", [("s2", "dog")])
    assert main(["import", str(labels)]) == 2
    error = capsys.readouterr().err
    assert "dvc remote add" in error and "is written" in error and "again" in error
    assert len(list((repo / "data" / "labelled").glob("*.npz"))) == 1 and _commits(repo) == 1
    _set_remote(repo, tmp_path / "remote")
    assert main(["import", str(labels)]) == 0
    assert len(list((repo / "data" / "labelled").glob("*.npz"))) == 1 and _commits(repo) == 2


@pytest.fixture
def plain_folder(tmp_path, monkeypatch, collected) -> Path:
    """No git, no DVC: the current folder holds only params.yaml."""
    folder = tmp_path / "plain"
    folder.mkdir()
    _params(folder, collected)
    monkeypatch.chdir(folder)
    return folder


def test_rejected_rows_fail_the_command_after_importing_the_rest(plain_folder, tmp_path, capsys):
    labels = _labels(tmp_path / "labels.csv", [("s3", "cat"), ("s4", "wolf")])
    assert main(["import", str(labels), "--classes", ",".join(CLASSES), "--no-commit"]) == 2
    assert "1 row(s)" in capsys.readouterr().err
    with np.load(next((plain_folder / "data" / "labelled").glob("*.npz"))) as archive:
        assert archive["sample_id"].tolist() == ["s3"]


def test_outside_git_the_error_says_what_to_do(plain_folder, tmp_path, capsys):
    labels = _labels(tmp_path / "labels.csv", [("s2", "dog")])
    assert main(["import", str(labels), "--classes", ",".join(CLASSES)]) == 2
    error = capsys.readouterr().err
    assert "not inside a git repository" in error and "git init" in error and "is written" in error
    assert len(list((plain_folder / "data" / "labelled").glob("*.npz"))) == 1


def test_without_class_names_the_error_says_where_they_come_from(plain_folder, tmp_path, capsys):
    assert main(["import", str(_labels(tmp_path / "labels.csv", [("s2", "dog")]))]) == 2
    assert "run the prepare stage" in capsys.readouterr().err


# ---- the holdout split and the prepare stage -------------------------------------------------------------
def _labelled_file(directory: Path, ids: list[str], stamp: int, shape=(8, 8, 1), classes=None) -> None:
    rng = np.random.default_rng(stamp)
    write_labelled(directory, rng.random((len(ids), *shape), dtype=np.float32), rng.integers(0, 10, len(ids)),
                   ids, classes or [str(k) for k in range(10)], datetime(2025, 1, 1, 0, 0, stamp, tzinfo=UTC))


def test_holdout_split_is_stable_as_labels_arrive(tmp_path):
    digits = [str(k) for k in range(10)]
    _labelled_file(tmp_path, [f"a{k}" for k in range(300)], 1)
    train, held = load_labelled_split(tmp_path, digits, 0.3)
    _labelled_file(tmp_path, [f"b{k}" for k in range(300)], 2)
    train_after, held_after = load_labelled_split(tmp_path, digits, 0.3)
    assert np.array_equal(held_after.x[:len(held.y)], held.x) and np.array_equal(train_after.x[:len(train.y)], train.x)
    assert 0.2 < len(held_after.y) / 600 < 0.4
    assert np.array_equal(load_labelled(tmp_path, digits, holdout_fraction=0.3).x, held_after.x)


def test_a_sample_never_changes_side_across_processes():
    """The README's promise: the split depends on the id alone, not on this process (e.g. its hash seed)."""
    ids = [f"device-{k % 7}/{k}" for k in range(2000)]
    here = is_held_out(np.array(ids), 0.3)
    code = ("import json, sys, numpy as np; from tasks.data.labelled import is_held_out; "
            "print(json.dumps(is_held_out(np.array(json.load(sys.stdin)), 0.3).tolist()))")
    for seed in ("1", "2"):  # another interpreter with another str hash seed than this one
        completed = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), cwd=REPO_ROOT,
                                   env={**os.environ, "PYTHONHASHSEED": seed}, capture_output=True, text=True)
        assert completed.returncode == 0, completed.stderr
        assert json.loads(completed.stdout) == here.tolist()
    assert 0.25 < here.mean() < 0.35  # and both sides are used


def test_files_without_sample_ids_are_held_out_entirely(tmp_path):
    np.savez(tmp_path / "legacy.npz", x=np.zeros((6, 8, 8, 1), np.float32), y=np.arange(6))
    train, held = load_labelled_split(tmp_path, [str(k) for k in range(10)], 0.3)
    assert train is None and len(held.y) == 6


def test_prepare_adds_the_labelled_training_part_to_train_only(tmp_path):
    labelled = tmp_path / "labelled"
    _labelled_file(labelled, [f"s{k}" for k in range(50)], 1)
    train_part, _ = load_labelled_split(labelled, [str(k) for k in range(10)], 0.3)
    plain, extended = Workspace(tmp_path / "plain"), Workspace(tmp_path / "extended")
    prepare(DataParams(), 1, plain)
    info, _ = prepare(DataParams(), 1, extended, labelled, 0.3)
    before, after = read_prepared(plain), read_prepared(extended)
    assert info.counts["train"] == len(before.train.y) + len(train_part.y)
    assert np.array_equal(after.train.x, np.concatenate([before.train.x, train_part.x]))
    for split in ("val", "test"):
        assert np.array_equal(getattr(after, split).x, getattr(before, split).x)
    assert np.array_equal(after.representative, before.representative)


@pytest.mark.parametrize(("shape", "classes", "message"), [((4, 4, 1), None, "input shape"),
                                                            ((8, 8, 1), list("abcdefghij"), "labelled with classes")])
def test_prepare_refuses_labelled_samples_that_do_not_fit(tmp_path, shape, classes, message):
    _labelled_file(tmp_path / "labelled", [f"s{k}" for k in range(20)], 1, shape, classes)
    with pytest.raises(DataError, match=message):
        prepare(DataParams(), 1, Workspace(tmp_path / "out"), tmp_path / "labelled", 0.3)
