"""``edgeloop simulate-drift``: each shift moves the features its way, severities are ordered and calibrated
for the drift check's tests, and the uploads are sample files the ingest endpoint accepts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from edge.features import feature_names, features
from edge.identity import is_upload_name, upload_owner
from edge.sidecar import write_sidecar
from tasks.monitoring import simulate_drift
from tasks.monitoring.sample_files import load_sample_arrays, validate_sample_file
from tasks.workspace import Workspace, save_arrays

REFERENCE_ROWS = 1200  # the digits before this index play the training data, the rest the test split
DRIFT_THRESHOLD, DRIFT_SHARE = 0.1, 0.5  # drift.feature_test and drift.drift_share in params.yaml


@pytest.fixture(scope="module")
def split(digits):
    return digits.x[REFERENCE_ROWS:], digits.y[REFERENCE_ROWS:]


@pytest.fixture(scope="module")
def reference_features(digits):
    return features(digits.x[:REFERENCE_ROWS])


def centroid_predictor(digits) -> simulate_drift.Predictor:
    """A model-free stand-in: softmax over negative distances to the class centroids."""
    flat = digits.x[:REFERENCE_ROWS].reshape(REFERENCE_ROWS, -1)
    centroids = np.stack([flat[digits.y[:REFERENCE_ROWS] == label].mean(axis=0) for label in range(10)])

    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = -8.0 * np.linalg.norm(batch.reshape(len(batch), 1, -1) - centroids, axis=2)
        probabilities = np.exp(logits - logits.max(axis=1, keepdims=True))
        return (probabilities / probabilities.sum(axis=1, keepdims=True)).astype(np.float32), \
            np.full(len(batch), 0.5, np.float32)
    return predict


def normed_wasserstein(reference: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Evidently's "wasserstein" test per feature column: distance over the reference's std (at least 0.001)."""
    return np.array([stats.wasserstein_distance(reference[:, column], current[:, column])
                     / max(float(np.std(reference[:, column])), 0.001) for column in range(reference.shape[1])])


@pytest.mark.parametrize("severity", ["low", "medium", "high"])
@pytest.mark.parametrize("kind", simulate_drift.KINDS)
def test_a_shift_keeps_shape_dtype_and_value_range(split, kind, severity):
    x, y = split
    shifted, labels = simulate_drift.shift(x, y, kind, severity, np.random.default_rng(0))
    assert shifted.shape == x.shape and shifted.dtype == np.float32 and labels.shape == y.shape
    assert shifted.min() >= x.min() and shifted.max() <= x.max()
    changed = (labels != y).any() if kind == "prior" else not np.array_equal(shifted, x)
    assert changed, f"{kind} at {severity} left the data as it was"


def test_severity_none_changes_nothing(split):
    x, y = split
    shifted, labels = simulate_drift.shift_all(x, y, simulate_drift.KINDS, "none", np.random.default_rng(0))
    assert np.array_equal(shifted, x) and np.array_equal(labels, y)


# kind, feature, +1 when the shift raises the feature's mean, -1 when it lowers it
DIRECTIONS = [
    ("blur", "gradient_energy_rows", -1), ("blur", "gradient_energy_cols", -1),
    ("brightness", "mean", +1), ("brightness", "min", +1),
    ("noise", "mean", +1), ("noise", "saturated_low", -1),  # background pixels can only get brighter
    ("contrast", "std", -1), ("contrast", "contrast", -1),
    ("occlusion", "saturated_low", +1), ("occlusion", "centre_minus_border", -1), ("occlusion", "mean", -1),
    ("rotation", "quadrant_mean_tl", +1), ("rotation", "quadrant_mean_tr", -1),  # ink moves along one diagonal
]


@pytest.mark.parametrize(("kind", "feature", "direction"), DIRECTIONS)
def test_a_shift_moves_its_features_the_expected_way(split, kind, feature, direction):
    x, y = split
    column = feature_names(x.shape[1:]).index(feature)
    before = features(x)[:, column].mean()
    after = features(simulate_drift.shift(x, y, kind, "high", np.random.default_rng(0))[0])[:, column].mean()
    assert np.sign(after - before) == direction, f"{kind}: {feature} {before:.4f} -> {after:.4f}"


def test_a_prior_shift_lets_two_classes_dominate(split):
    x, y = split
    shares = {}
    for severity in ("none", "low", "high"):
        labels = simulate_drift.shift(x, y, "prior", severity, np.random.default_rng(0))[1]
        shares[severity] = np.sort(np.bincount(labels, minlength=10))[-2:].sum() / len(labels)
    assert shares["none"] < 0.25 < shares["low"] < shares["high"], shares
    assert shares["high"] > 0.75


@pytest.mark.parametrize("kinds", [simulate_drift.DEFAULT_KINDS, *((kind,) for kind in simulate_drift.KINDS)],
                         ids="+".join)
def test_stronger_severities_move_the_features_further(split, reference_features, kinds):
    x, y = split
    distances = [normed_wasserstein(reference_features, features(simulate_drift.shift_all(
        x, y, kinds, severity, np.random.default_rng(0))[0])).mean() for severity in simulate_drift.SEVERITIES]
    assert distances == sorted(distances) and len(set(distances)) == 4, dict(zip(simulate_drift.SEVERITIES,
                                                                                 distances))


def test_the_default_mix_is_calibrated_for_the_drift_check(digits, split, reference_features):
    """300-row windows like the CLI's: none never drifts, medium and high always do (low is borderline)."""
    x, y = split
    predict = centroid_predictor(digits)
    shares = {severity: [] for severity in simulate_drift.SEVERITIES}
    for seed in range(3):
        for severity in simulate_drift.SEVERITIES:
            window = simulate_drift.simulate_window(x, y, predict, severity, simulate_drift.DEFAULT_KINDS,
                                                    np.random.default_rng(seed), 300, 0.0, 3600.0)
            distances = normed_wasserstein(reference_features, features(window.x))
            shares[severity].append(float(np.mean(distances >= DRIFT_THRESHOLD)))
    assert max(shares["none"]) < DRIFT_SHARE, shares
    assert min(shares["medium"]) >= DRIFT_SHARE + 0.2 and min(shares["high"]) >= 0.9, shares
    assert np.mean(shares["none"]) < np.mean(shares["low"]) < np.mean(shares["medium"]), shares


def test_uploads_are_sample_files_the_ingest_endpoint_accepts(digits, split, tmp_path):
    x, y = split
    window = simulate_drift.simulate_window(x, y, centroid_predictor(digits), "medium", ("blur", "prior"),
                                            np.random.default_rng(0), 50, 1000.0, 4600.0)
    devices = ["sim-00", "sim-01", "sim-02"]
    paths = simulate_drift.write_uploads(window, tmp_path, devices, "v7", 0, "medium", "abcd1234")
    assert [upload_owner(path.name) for path in paths] == devices
    rows = 0
    for path, device in zip(paths, devices):
        assert is_upload_name(path.name.split("--", 1)[1])
        rows += validate_sample_file(path.read_bytes(), device)
        arrays = load_sample_arrays(path.read_bytes())
        assert arrays["x"].shape[1:] == x.shape[1:] and arrays["x"].dtype == np.float32
        assert np.allclose(arrays["features"], features(arrays["x"]))
        assert list(arrays["feature_names"]) == feature_names(x.shape[1:])
        assert set(arrays["model_version"]) == {"v7"} and set(arrays["reason"]) == {"rate"}
        assert 1000.0 <= arrays["timestamp"].min() and arrays["timestamp"].max() < 4600.0
    assert rows == 50
    without_raw = simulate_drift.write_uploads(window, tmp_path, ["dev"], "v7", 1, "medium", "abcd1234", raw=False)
    assert "x" not in load_sample_arrays(without_raw[0].read_bytes())
    assert validate_sample_file(without_raw[0].read_bytes(), "dev") == 50


def test_window_summary_figures_follow_the_model(digits, split):
    x, y = split
    window = simulate_drift.simulate_window(x, y, centroid_predictor(digits), "none", ("noise",),
                                            np.random.default_rng(0), 500, 0.0, 1.0)  # more rows than the split
    assert len(window.y) == 500 and window.accuracy > 0.8
    assert np.all(np.diff(window.timestamps) >= 0) and window.confidence.dtype == np.float32


# ---- the command --------------------------------------------------------------------------------

def _linear_onnx_model(digits, path: Path) -> Path:
    """A least-squares linear digits classifier as an ONNX file with a sidecar (no TensorFlow needed)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    flat = np.hstack([digits.x.reshape(len(digits.x), -1), np.ones((len(digits.x), 1), np.float32)])
    weights = np.linalg.lstsq(flat, np.eye(10, dtype=np.float32)[digits.y], rcond=None)[0].astype(np.float32) * 10
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["image", "shape"], ["flat"]),
         helper.make_node("Gemm", ["flat", "weights", "bias"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "digits_linear",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 8, 8, 1])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(np.array([-1, 64], np.int64), "shape"),
         numpy_helper.from_array(weights[:-1], "weights"), numpy_helper.from_array(weights[-1], "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    write_sidecar(path, {"variant": "onnx_fp32", "data_version": "digits-test-data"})
    return path


@pytest.fixture(scope="module")
def workspace(digits, tmp_path_factory) -> Workspace:
    workspace = Workspace(tmp_path_factory.mktemp("simulate-drift"))
    save_arrays(workspace.split_file("test"), x=digits.x[REFERENCE_ROWS:], y=digits.y[REFERENCE_ROWS:])
    _linear_onnx_model(digits, workspace.root / "linear.onnx")
    return workspace


def test_the_command_writes_windows_of_uploads(workspace, tmp_path, capsys):
    out = tmp_path / "collected"
    code = simulate_drift.main(["--workspace", str(workspace.root), "--model", str(workspace.root / "linear.onnx"),
                                "--severity", "high", "--kinds", "rotation,prior", "--devices", "2",
                                "--samples", "40", "--windows", "2", "--window-minutes", "30", "--out", str(out)])
    assert code == 0
    files = sorted(out.glob("*.npz"))
    names = [re.fullmatch(r"(sim-0[01])--sim-(00[01])-high-[0-9a-f]{8}\.npz", path.name) for path in files]
    assert len(files) == 4 and all(names)
    windows = {}
    for path, (device, window) in zip(files, (name.groups() for name in names)):
        arrays = load_sample_arrays(path.read_bytes())
        assert validate_sample_file(path.read_bytes(), device) == 20 and "x" in arrays
        assert set(arrays["model_version"]) == {"digits-test-data"}  # from the sidecar
        windows.setdefault(window, []).append(arrays["timestamp"])
    first, second = (np.concatenate(windows[key]) for key in sorted(windows))
    assert first.max() <= second.min() and second.max() - first.min() <= 3600.0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("window ")]
    assert len(lines) == 2 and all("2 files, 40 rows, severity high, kinds rotation,prior" in line for line in lines)
    assert all("mean confidence" in line and "accuracy" in line for line in lines)


@pytest.mark.parametrize(("arguments", "message"), [
    (["--severity", "extreme"], "invalid choice: 'extreme'"),
    (["--kinds", "blur,fog"], "unknown kinds ['fog']"),
    (["--samples", "2", "--devices", "3"], "--samples (2) must be at least --devices (3)"),
])
def test_bad_arguments_exit_2_with_a_message(workspace, tmp_path, capsys, arguments, message):
    argv = ["--workspace", str(workspace.root), "--model", str(workspace.root / "linear.onnx"),
            "--out", str(tmp_path), *arguments]
    try:
        code = simulate_drift.main(argv)
    except SystemExit as exit_:  # argparse's own refusals
        code = exit_.code
    assert code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.npz"))


def test_a_workspace_without_a_model_names_the_stage_to_run(workspace, tmp_path, capsys):
    assert simulate_drift.main(["--workspace", str(workspace.root), "--out", str(tmp_path)]) == 2
    assert "run the convert stage" in capsys.readouterr().err


def test_a_missing_workspace_is_one_line_from_edgeloop(tmp_path):
    edgeloop = Path(sys.executable).parent / "edgeloop"
    completed = subprocess.run([str(edgeloop), "simulate-drift", "--workspace", str(tmp_path / "nowhere"),
                                "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2, completed.stderr
    assert "error:" in completed.stderr and "run the prepare stage first" in completed.stderr
    assert "Traceback" not in completed.stderr
