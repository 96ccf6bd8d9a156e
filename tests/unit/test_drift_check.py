"""The drift check's parts without servers: windows and quarantine, Evidently analysis, trigger policy, exports."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest

from edge.features import feature_names, features
from tasks.config import ColumnTest, DriftParams
from tasks.monitoring import collected
from tasks.monitoring.analysis import analyse
from tasks.monitoring.check import CheckOutcome
from tasks.monitoring.figures import event_payload, labelled, mlflow_metrics, prometheus_text
from tasks.monitoring.policy import MAX_STATE_CHARS, Decision, DriftState, Verdict, decide
from tasks.monitoring.reference import build_reference, read_reference, write_reference

HOUR = 3600.0


@pytest.fixture(scope="module")
def digits():
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(1).permutation(len(data.target))
    return (data.images[order] / 16.0).astype(np.float32)[..., None], data.target[order]


@pytest.fixture(scope="module")
def reference(digits):
    x, y = digits
    return build_reference(x[:900], np.eye(10, dtype=np.float32)[y[:900]] * 0.9 + 0.01, 2000, seed=0)


def sample_arrays(x, predicted, device="dev-1", confidence=0.95, latency_ms=4.0, version="v1", raw=True):
    rows = len(x)
    arrays = {"features": features(x), "feature_names": np.array(feature_names(x.shape[1:])),
              "confidence": np.full(rows, confidence, np.float32), "predicted": np.asarray(predicted, np.int32),
              "latency_ms": np.full(rows, latency_ms, np.float32), "model_version": np.array([version] * rows),
              "timestamp": np.full(rows, 1.7e9), "sample_id": np.array([uuid.uuid4().hex for _ in range(rows)]),
              "reason": np.array(["rate"] * rows), "device_id": np.array([device] * rows)}
    if raw:
        arrays["x"] = x
    return arrays


def upload(directory, name, arrays):
    directory.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path = directory / f"{arrays['device_id'][0]}--{name}"
    path.write_bytes(buffer.getvalue())
    return path


# ---- windows and quarantine --------------------------------------------------------------------

def test_uploads_become_one_window_and_move_to_processed(tmp_path, digits):
    x, y = digits
    upload(tmp_path, "a.npz", sample_arrays(x[:30], y[:30], device="dev-1"))
    upload(tmp_path, "b.npz", sample_arrays(x[30:50], y[30:50], device="dev-2", raw=False))
    window = collected.consolidate(tmp_path)
    assert window.rows == 50 and window.files == ["dev-1--a.npz", "dev-2--b.npz"] and not window.quarantined
    stored = collected.read_window(window.path)
    assert stored["features"].shape == (50, len(window.feature_names))
    assert len(stored["x"]) == 30 and list(stored["x_sample_id"]) == list(stored["sample_id"][:30])  # raw rows only
    assert collected.pending_uploads(tmp_path) == []
    assert sorted(p.name for p in (tmp_path / "processed" / window.window_id).iterdir()) == window.files


def test_malformed_uploads_are_quarantined_with_their_reason(tmp_path, digits):
    x, y = digits
    good = sample_arrays(x[:20], y[:20])
    upload(tmp_path, "good.npz", good)
    (tmp_path / "dev-1--corrupt.npz").write_bytes(b"PK\x03\x04 not really a zip")
    upload(tmp_path, "nan.npz", {**sample_arrays(x[:5], y[:5]), "confidence": np.full(5, np.nan, np.float32)})
    upload(tmp_path, "old.npz", sample_arrays(x[:5], y[:5], version="v99"))
    other = sample_arrays(x[:5], y[:5])
    other["feature_names"] = np.array([f"f{i}" for i in range(len(other["feature_names"]))])
    upload(tmp_path, "renamed.npz", other)
    (tmp_path / "noprefix.npz").write_bytes((tmp_path / "dev-1--good.npz").read_bytes())
    window = collected.consolidate(tmp_path, known_versions={"v1", "1"})
    assert window.files == ["dev-1--good.npz"] and window.rows == 20
    reasons = {name: (tmp_path / "quarantine" / f"{name}.reason.txt").read_text() for name in window.quarantined}
    assert set(reasons) == {"dev-1--corrupt.npz", "dev-1--nan.npz", "dev-1--old.npz", "dev-1--renamed.npz",
                            "noprefix.npz"}
    assert "not a readable .npz" in reasons["dev-1--corrupt.npz"]
    assert "NaN" in reasons["dev-1--nan.npz"]
    assert "['v99'] are not registered" in reasons["dev-1--old.npz"]
    assert "differ from the window's" in reasons["dev-1--renamed.npz"]
    assert "'<device>--<upload name>'" in reasons["noprefix.npz"]
    for name in reasons:  # kept byte for byte, beside its reason
        assert (tmp_path / "quarantine" / name).is_file()


def test_a_name_that_could_belong_to_two_devices_is_quarantined_never_attributed(tmp_path, digits):
    """``site--a--1.npz`` could be device ``site``'s ``a--1.npz`` or ``site--a``'s ``1.npz``: neither id nor upload
    name may hold ``--``, so it is nobody's; ``site--a-1.npz`` is ``site``'s and checked against its rows."""
    x, y = digits
    upload(tmp_path, "a-1.npz", sample_arrays(x[:10], y[:10], device="site"))
    (tmp_path / "site--a--1.npz").write_bytes((tmp_path / "site--a-1.npz").read_bytes())
    (tmp_path / "site--a-2.npz").write_bytes(
        (upload(tmp_path / "elsewhere", "x.npz", sample_arrays(x[:5], y[:5], device="a"))).read_bytes())
    window = collected.consolidate(tmp_path)
    assert window.files == ["site--a-1.npz"] and window.rows == 10
    assert set(window.quarantined) == {"site--a--1.npz", "site--a-2.npz"}
    assert "no two in a row" in window.quarantined["site--a--1.npz"]
    assert "device_id column names ['a']" in window.quarantined["site--a-2.npz"]


def test_resent_rows_are_dropped_as_duplicates_even_after_a_crash(tmp_path, digits):
    x, y = digits
    arrays = sample_arrays(x[:40], y[:40])
    path = upload(tmp_path, "a.npz", arrays)
    content = path.read_bytes()
    first = collected.consolidate(tmp_path)
    path.write_bytes(content)  # the device re-sent it (or a crash left it pending after the window was written)
    upload(tmp_path, "b.npz", {**sample_arrays(x[40:50], y[40:50])})
    second = collected.consolidate(tmp_path)
    assert first.rows == 40 and second.rows == 10 and second.duplicates == 40


def test_reading_without_consuming_moves_nothing(tmp_path, digits):
    x, y = digits
    upload(tmp_path, "a.npz", sample_arrays(x[:40], y[:40]))
    window = collected.consolidate(tmp_path, consume=False)
    assert window.rows == 40 and window.path is None and len(collected.pending_uploads(tmp_path)) == 1


# ---- analysis -----------------------------------------------------------------------------------

def test_undrifted_data_passes_and_shifted_data_drifts(digits, reference):
    x, y = digits
    params = DriftParams()
    same = analyse("w1", sample_arrays(x[900:], y[900:]), reference, params)
    assert same.status == "ok" and same.drift_share < params.drift_share and not same.prediction.drifted
    assert same.untested == ["min", "p05"]  # always 0 on dark-background digits: no spread to scale by
    noisy = np.clip(x[900:] + np.random.default_rng(0).normal(0, 0.1, x[900:].shape), 0, 1).astype(np.float32)
    drifted = analyse("w2", sample_arrays(noisy, y[900:]), reference, params)
    assert drifted.status == "drift" and drifted.dataset_drift and drifted.drift_share >= 0.5
    assert "gradient_energy_rows" in drifted.drifted_features and drifted.reasons[0].startswith("feature drift")


def test_prediction_drift_confidence_and_latency_rules(digits, reference):
    x, y = digits
    params = DriftParams()
    ones = np.ones_like(y[900:])  # a model answering "1" to everything: a predicted-class shift
    result = analyse("w", sample_arrays(x[900:], ones, confidence=0.6, latency_ms=250.0), reference, params)
    assert result.status == "drift" and result.prediction.drifted
    assert any(r.startswith("prediction drift: jensenshannon") for r in result.reasons)
    assert "mean confidence 0.600 < 0.85" in result.reasons and "latency p95 250.0 ms > 200.0 ms" in result.reasons


def test_per_column_tests_and_p_value_direction(digits, reference):
    x, y = digits
    params = DriftParams(feature_test=ColumnTest(method="ks", threshold=0.05),
                         column_tests={"mean": ColumnTest(method="psi", threshold=0.2)})
    result = analyse("w", sample_arrays(x[900:], y[900:]), reference, params)
    assert result.features["mean"].method == "psi" and result.features["std"].method == "ks"
    assert all(s.drifted == (s.score < 0.05) for n, s in result.features.items() if n != "mean")


def test_small_and_invalid_windows_get_no_drift_verdict(digits, reference):
    x, y = digits
    params = DriftParams(min_samples=50)
    small = analyse("w", sample_arrays(x[:49], y[:49], confidence=0.1), reference, params)
    assert small.status == "too_small" and "no verdict" in small.reasons[0]
    missing = sample_arrays(x[:100], y[:100])
    missing["features"], missing["feature_names"] = missing["features"][:, :10], missing["feature_names"][:10]
    invalid = analyse("w", missing, reference, params)
    assert invalid.status == "invalid" and "are missing" in invalid.reasons[0]
    nan = sample_arrays(x[:100], y[:100])
    nan["features"][3, 2] = np.nan
    assert "NaN" in analyse("w", nan, reference, params).reasons[0]


def test_large_windows_are_sampled_for_the_tests_but_the_rules_see_every_row(digits, reference):
    x, y = digits
    big = sample_arrays(np.concatenate([x] * 2), np.concatenate([y] * 2))
    big["latency_ms"][:] = 5.0
    big["latency_ms"][-200:] = 400.0  # slow rows at the end: outside most samples, never outside the rule
    result = analyse("w", big, reference, DriftParams(max_rows=1000))
    assert result.analysed_rows == 1000 and result.rows == 2 * len(x) and result.latency_p95_ms == 400.0


def test_reference_round_trip_and_bad_reference(tmp_path, reference):
    write_reference(tmp_path / "r.npz", reference)
    again = read_reference(tmp_path / "r.npz")
    assert np.array_equal(again.features, reference.features) and again.feature_names == reference.feature_names
    np.savez(tmp_path / "bad.npz", features=np.zeros((3, 2)))
    with pytest.raises(Exception, match="lacks"):
        read_reference(tmp_path / "bad.npz")


# ---- trigger policy -------------------------------------------------------------------------------

def _verdict(index: int, status: str, at: float) -> Verdict:
    return Verdict(window_id=f"w{index}", at=at, status=status, reasons=["x" * 500])


def _run(statuses, params, retrain_started=None, start=1e9, state=None):
    state, fired = state or DriftState(), []
    for index, status in enumerate(statuses):
        verdict = _verdict(index, status, start + index * HOUR)
        decision = decide(state, verdict, params, retrain_started)
        fired.append(decision.fire)
        state = state.recorded(verdict, decision.fire)
    return fired, state


def test_two_consecutive_windows_fire_exactly_once():
    params = DriftParams(consecutive_windows=2, cooldown_h=0)
    assert _run(["drift", "drift", "drift"], params)[0] == [False, True, False]  # the run is used up
    assert _run(["drift", "ok", "drift"], params)[0] == [False, False, False]
    assert _run(["drift", "too_small", "invalid", "drift"], params)[0] == [False, False, False, True]
    assert _run(["too_small", "too_small"], params)[0] == [False, False]


def test_cooldown_counts_from_the_last_retrain_or_trigger():
    params = DriftParams(consecutive_windows=2, cooldown_h=24)
    start = 1e9
    fired, _ = _run(["drift"] * 4, params, retrain_started=start - 2 * HOUR, start=start)
    assert fired == [False] * 4  # a retrain started two hours before the first window
    fired, state = _run(["drift", "drift", "drift", "drift"], params, start=start)
    assert fired == [False, True, False, False] and state.last_trigger_at == start + HOUR
    decision = decide(state, _verdict(9, "drift", start + 30 * HOUR), params, None)
    assert decision.fire  # cooldown over, drift still there in two windows since the trigger


def test_state_fits_a_prefect_variable():
    _, state = _run(["drift", "ok"] * 20, DriftParams(consecutive_windows=12, cooldown_h=0))
    assert len(state.model_dump_json(by_alias=True)) <= MAX_STATE_CHARS and len(state.verdicts) >= 12
    assert DriftState.model_validate(state.model_dump(mode="json", by_alias=True)) == state


def test_trigger_policy_parameters_are_validated():
    with pytest.raises(ValueError):
        DriftParams(consecutive_windows=0)
    with pytest.raises(ValueError):
        DriftParams(cooldown_h=-1)
    with pytest.raises(ValueError):
        DriftParams(feature_test={"method": "t-test-of-my-own", "threshold": 0.1})


def test_prometheus_export_names_the_headline_figures(digits, reference, tmp_path):
    x, y = digits
    analysis = analyse("w", sample_arrays(x[900:], y[900:]), reference, DriftParams())
    outcome = CheckOutcome(collected.Window("w", {}), analysis, tmp_path)
    text = prometheus_text(outcome.summary())
    assert "edgeloop_drift_share " in text and "edgeloop_drift_exceeded 0" in text
    assert "# TYPE edgeloop_drift_mean_confidence gauge" in text and "edgeloop_drift_streak" not in text


def test_one_table_feeds_prometheus_mlflow_the_event_and_the_artifact(digits, reference, tmp_path):
    from prometheus_client.parser import text_string_to_metric_families

    x, y = digits
    analysis = analyse("w", sample_arrays(x[900:], y[900:], confidence=0.6), reference, DriftParams())
    window = collected.Window("w", {}, quarantined={"dev-1--bad.npz": "torn"}, duplicates=3)
    outcome = CheckOutcome(window, analysis, tmp_path, decision=Decision(True, 2, "fires"))
    summary = outcome.summary()
    gauges = {family.name: (family.documentation, family.samples[0].value)
              for family in text_string_to_metric_families(prometheus_text(summary))}
    assert gauges["edgeloop_drift_window_rows"] == ("rows in the newest window", analysis.rows)
    assert gauges["edgeloop_drift_mean_confidence"] == ("mean top-class confidence", pytest.approx(0.6))
    assert gauges["edgeloop_drift_streak"][1] == 2 and gauges["edgeloop_drift_triggered"][1] == 1
    assert gauges["edgeloop_drift_exceeded"][1] == 1 and gauges["edgeloop_drift_invalid"][1] == 0
    assert gauges["edgeloop_drift_quarantined_files"][1] == 1
    assert gauges["edgeloop_drift_prediction_score"][1] == pytest.approx(analysis.prediction.score)
    metrics = mlflow_metrics(summary)
    assert metrics["drifted_features"] == len(analysis.drifted_features) and metrics["duplicates"] == 3
    assert metrics["triggered"] == 1 and metrics["streak"] == 2 and metrics["quarantined_files"] == 1
    assert {f"feature.{name}" for name in analysis.features} <= set(metrics)
    payload = event_payload(summary)
    assert list(payload) == ["window_id", "status", "reasons", "rows", "mean_confidence", "latency_p95_ms",
                             "drift_share", "drifted_features", "reference", "decision", "window_file", "mlflow_run"]
    assert payload["drifted_features"] == analysis.drifted_features and payload["decision"]["streak"] == 2
    assert [label for label, _ in labelled(summary)] == ["mean confidence", "latency p95 (ms)",
                                                         "share of features drifted"]
