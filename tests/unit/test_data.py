import json
import re

import numpy as np
import pytest
from PIL import Image

from tasks.config import DataParams
from tasks.contracts import Dataset, Workspace, read_prepared, write_prepared
from tasks.data.prepare import prepare, split_dataset
from tasks.data.sources import load_source, validate_dataset
from tasks.errors import DataError, StageError
from tasks.lineage import directory_md5


def test_bundled_digits_are_real_and_normalised(digits):
    assert digits.x.shape == (1797, 8, 8, 1)
    assert digits.x.dtype == np.float32 and 0.0 <= digits.x.min() and digits.x.max() <= 1.0
    assert sorted(np.unique(digits.y)) == list(range(10))


def test_split_is_stratified_seeded_and_disjoint(digits):
    params = DataParams()
    first, again = split_dataset(digits, params, 42), split_dataset(digits, params, 42)
    other = split_dataset(digits, params, 7)
    assert np.array_equal(first.test.y, again.test.y) and np.array_equal(first.test.x, again.test.x)
    assert not np.array_equal(first.test.x, other.test.x)
    total = len(first.train.y) + len(first.val.y) + len(first.test.y)
    assert total == 1797
    assert abs(len(first.test.y) / total - params.test_fraction) < 0.01
    # every class keeps its share in each split
    shares = np.bincount(first.test.y) / len(first.test.y)
    assert np.allclose(shares, np.bincount(digits.y) / len(digits.y), atol=0.01)
    assert len(first.representative) == params.representative_samples
    train_rows = {row.tobytes() for row in first.train.x}
    assert all(row.tobytes() in train_rows for row in first.representative)


def test_prepare_roundtrip_and_version(tmp_path):
    workspace = Workspace(tmp_path)
    _, version = prepare(DataParams(), 1, workspace)
    loaded = read_prepared(workspace)
    assert loaded.test.x.shape[1:] == (8, 8, 1)
    out = workspace.prepared_dir
    assert json.loads((out / "dataset.json").read_text())["num_classes"] == 10
    assert version.endswith(".dir") and version == directory_md5(out)
    _, version_again = prepare(DataParams(), 1, workspace)
    assert version_again == version
    _, other_version = prepare(DataParams(), 2, workspace)
    assert other_version != version


def test_read_prepared_before_prepare_says_what_to_run(tmp_path):
    with pytest.raises(StageError, match="run the prepare stage"):
        read_prepared(Workspace(tmp_path))


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return DataParams(source="npz", path=path)


def test_npz_source_loads(tmp_path, rng):
    x = rng.integers(0, 255, size=(40, 12, 12)).astype(np.uint8)
    y = np.repeat([0, 1, 2, 3], 10)
    dataset = load_source(_npz(tmp_path, x=x, y=y, labels=np.array(["a", "b", "c", "d"])))
    assert dataset.x.shape == (40, 12, 12, 1) and dataset.x.max() <= 1.0
    assert dataset.labels == ["a", "b", "c", "d"]


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.zeros((10, 8, 8))}, "lacks array"),
        ({"x": np.zeros((10, 8)), "y": np.zeros(10, int)}, "expected (N, H, W)"),
        ({"x": np.zeros((10, 8, 8)), "y": np.zeros(10)}, "must be integers"),
        ({"x": np.zeros((10, 8, 8)), "y": np.zeros(10, int)}, "only one class"),
        ({"x": np.full((12, 8, 8), np.nan), "y": np.repeat([0, 1], 6)}, "NaN"),
        ({"x": np.zeros((12, 8, 8)), "y": np.repeat([0, 1], 6), "labels": np.array(["a"])}, "outside 0..0"),
        ({"x": np.zeros((12, 8, 8)), "y": np.repeat([0, 1], 6)[:11]}, "one label per image"),
        ({"x": np.zeros((12, 8, 8)), "y": np.array([0] * 10 + [1, 1])}, "fewer than 4 examples"),
    ],
)
def test_bad_npz_is_rejected_with_reason(tmp_path, arrays, message):
    with pytest.raises(DataError, match=re.escape(message)):
        load_source(_npz(tmp_path, **arrays))


def test_missing_and_corrupt_npz(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_source(DataParams(source="npz", path=tmp_path / "nope.npz"))
    corrupt = tmp_path / "bad.npz"
    corrupt.write_bytes(b"not a zip archive")
    with pytest.raises(DataError, match="not a readable"):
        load_source(DataParams(source="npz", path=corrupt))


def _image_tree(root, classes=("cat", "dog"), per_class=5, size=(10, 10)):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.integers(0, 255, size=size, dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{index}.png")


def test_image_folder_source(tmp_path):
    _image_tree(tmp_path / "images")
    params = DataParams(source="image_folder", path=tmp_path / "images", image_size=(6, 6), color_mode="rgb")
    dataset = load_source(params)
    assert dataset.x.shape == (10, 6, 6, 3)
    assert dataset.labels == ["cat", "dog"] and sorted(set(dataset.y)) == [0, 1]


def test_image_folder_errors(tmp_path):
    with pytest.raises(DataError, match="not a directory"):
        load_source(DataParams(source="image_folder", path=tmp_path / "none"))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_source(DataParams(source="image_folder", path=tmp_path / "empty"))
    _image_tree(tmp_path / "broken")
    (tmp_path / "broken" / "cat" / "x.png").write_bytes(b"garbage")
    with pytest.raises(DataError, match="x.png is not a readable image"):
        load_source(DataParams(source="image_folder", path=tmp_path / "broken"))


def test_validate_rejects_empty():
    with pytest.raises(DataError, match="non-empty"):
        validate_dataset(Dataset(np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, np.int64), ["a", "b"]))


def test_write_prepared_writes_every_split(tmp_path, digits):
    prepared = split_dataset(digits, DataParams(), 0)
    info = write_prepared(Workspace(tmp_path), prepared, "sklearn_digits")
    assert sorted(p.name for p in Workspace(tmp_path).prepared_dir.iterdir()) == [
        "dataset.json", "representative.npz", "test.npz", "train.npz", "val.npz"]
    assert info.counts == {"train": len(prepared.train.y), "val": len(prepared.val.y), "test": len(prepared.test.y)}


def test_prepare_cli_reports_bad_data_without_traceback(tmp_path):
    import subprocess
    import sys

    from tests.conftest import REPO_ROOT

    np.savez(tmp_path / "few.npz", x=np.random.rand(40, 8, 8), y=np.repeat(np.arange(10), 4))
    params = tmp_path / "params.yaml"
    params.write_text(f"data:\n  source: npz\n  path: {tmp_path / 'few.npz'}\n")
    completed = subprocess.run([sys.executable, "-m", "tasks.data.prepare", "--params", str(params),
                                "--workspace", str(tmp_path / "out")], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 2
    assert "cannot split 40 examples" in completed.stderr and "Traceback" not in completed.stderr
    assert not (tmp_path / "out").exists()


def test_a_damaged_or_foreign_stage_record_is_a_clear_error(tmp_path):
    from tasks.contracts import read_train_summary

    workspace = Workspace(tmp_path)
    workspace.keras_dir.mkdir(parents=True)
    workspace.train_summary_file.write_text('{"model": "digits_cnn", "written_by": "an older edgeloop"}')
    with pytest.raises(StageError, match="re-run the train stage"):
        read_train_summary(workspace)
    _, _ = prepare(DataParams(), 1, workspace)
    workspace.split_file("val").write_bytes(b"truncated")
    with pytest.raises(StageError, match="val.npz is unreadable"):
        read_prepared(workspace)
