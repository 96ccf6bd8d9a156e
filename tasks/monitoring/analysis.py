"""Is a window of collected features drifted from the model's reference? Evidently 0.7 plus the guide's rules.

- Feature drift: Evidently's ``DataDriftPreset`` over the feature columns of :mod:`edge.features`, with the
  test and threshold of ``drift.feature_test`` (or ``drift.column_tests[column]``); the dataset drifts when
  at least ``drift.drift_share`` of the columns do.
- Prediction drift: Evidently's ``ValueDrift`` of the predicted class against the reference's predictions
  (``drift.prediction_test``): a class-prior shift, or a model now answering differently.
- The guide's rules: mean confidence below ``drift.min_mean_confidence`` (0.85), latency p95 above
  ``drift.max_latency_p95_ms`` (200 ms, from the devices' own per-row timings).

A window smaller than ``drift.min_samples`` gets no verdict (``too_small``); one with NaN features or
missing feature columns is ``invalid``: reported, never counted as drift. Columns constant in the
reference (no spread to scale a distance by) are listed as ``untested``; the others carry the verdict.
Windows above ``drift.max_rows`` rows are sampled uniformly (seeded) before the statistical tests; the
rules use every row.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks.config import P_VALUE_TESTS, ColumnTest, DriftParams
from tasks.monitoring.reference import Reference
from tasks.monitoring.sample_files import column_names

Status = Literal["drift", "ok", "too_small", "invalid"]
PREDICTED = "predicted"
CONSTANT_STD = 1e-7  # a reference column this flat (e.g. ``min`` of dark-background images) is not tested


@dataclass
class ColumnScore:
    method: str
    threshold: float
    score: float
    drifted: bool


@dataclass
class WindowAnalysis:
    window_id: str
    rows: int
    status: Status = "ok"
    reasons: list[str] = field(default_factory=list)  # why drift, too_small or invalid
    analysed_rows: int = 0                              # rows the statistical tests saw (sampled above max_rows)
    untested: list[str] = field(default_factory=list)   # constant in the reference: no distance to scale by
    features: dict[str, ColumnScore] = field(default_factory=dict)
    drift_share: float | None = None                    # share of feature columns drifted
    dataset_drift: bool = False
    prediction: ColumnScore | None = None
    mean_confidence: float | None = None
    latency_p95_ms: float | None = None
    devices: int = 0
    reference: str = ""                                  # which reference (champion vN, or a file)
    seconds: float = 0.0                                 # time the statistical tests took

    @property
    def exceeded(self) -> bool:
        return self.status == "drift"

    @property
    def drifted_features(self) -> list[str]:
        return sorted((name for name, score in self.features.items() if score.drifted),
                      key=lambda name: -self.features[name].score)

    def as_dict(self) -> dict[str, Any]:
        record = asdict(self)
        record["drifted_features"] = self.drifted_features
        return record


def _column_test(params: DriftParams, column: str) -> ColumnTest:
    return params.column_tests.get(column, params.feature_test)


def is_drifted(test: ColumnTest, score: float) -> bool:
    """p-value tests drift below their threshold; distances at or above it."""
    return score < test.threshold if test.method in P_VALUE_TESTS else score >= test.threshold


def _validity(arrays: dict[str, np.ndarray], reference: Reference) -> str | None:
    names = column_names(arrays)
    missing = [name for name in reference.feature_names if name not in names]
    if missing:
        return f"feature columns {missing} are missing (the reference has {len(reference.feature_names)})"
    features = arrays["features"]
    if not np.isfinite(features).all():
        bad = sorted({names[column] for column in np.where(~np.isfinite(features).all(axis=0))[0]})
        return f"NaN or infinite values in feature columns {bad}"
    return None


def _frames(arrays: dict[str, np.ndarray], reference: Reference, rows: np.ndarray):
    import pandas as pd

    names = column_names(arrays)
    columns = [names.index(name) for name in reference.feature_names]
    current = pd.DataFrame(arrays["features"][rows][:, columns], columns=list(reference.feature_names))
    current[PREDICTED] = arrays["predicted"][rows].astype(np.int64)
    baseline = pd.DataFrame(reference.features, columns=list(reference.feature_names))
    baseline[PREDICTED] = reference.predicted.astype(np.int64)
    return current, baseline


def run_report(current, baseline, feature_columns: list[str], params: DriftParams):
    """The Evidently snapshot of one window: the drift preset over the features, value drift of predictions."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.metrics import ValueDrift
    from evidently.presets import DataDriftPreset

    definition = DataDefinition(numerical_columns=feature_columns, categorical_columns=[PREDICTED])
    preset = DataDriftPreset(
        columns=feature_columns, drift_share=params.drift_share,
        method=params.feature_test.method, threshold=params.feature_test.threshold,
        per_column_method={name: test.method for name, test in params.column_tests.items()},
        per_column_threshold={name: test.threshold for name, test in params.column_tests.items()})
    prediction = ValueDrift(column=PREDICTED, method=params.prediction_test.method,
                            threshold=params.prediction_test.threshold)
    report = Report([preset, prediction])
    return report.run(Dataset.from_pandas(current, data_definition=definition),
                      Dataset.from_pandas(baseline, data_definition=definition))


def _value_drift_scores(snapshot) -> dict[str, float]:
    scores: dict[str, float] = {}
    for metric in snapshot.dict()["metrics"]:
        config = metric.get("config", {})
        if config.get("type", "").endswith(":ValueDrift"):
            scores[config["column"]] = float(metric["value"])
    return scores


def analyse(window_id: str, arrays: dict[str, np.ndarray], reference: Reference, params: DriftParams,
            seed: int = 0, html: Path | None = None) -> WindowAnalysis:
    """Verdict on one window (see the module docstring); ``html`` receives Evidently's report when given."""
    import time

    rows = 0 if "features" not in arrays else len(arrays["features"])
    result = WindowAnalysis(window_id, rows)
    if rows:
        result.mean_confidence = float(np.mean(arrays["confidence"]))
        result.latency_p95_ms = float(np.percentile(arrays["latency_ms"], 95))
        result.devices = len(set(arrays["device_id"].tolist()))
    if rows < params.min_samples:
        result.status = "too_small"
        result.reasons.append(f"only {rows} samples (< drift.min_samples {params.min_samples}): no verdict")
        return result
    problem = _validity(arrays, reference)
    if problem:
        result.status = "invalid"
        result.reasons.append(f"invalid window: {problem}")
        return result
    picked = np.arange(rows)
    if rows > params.max_rows:
        picked = np.sort(np.random.default_rng(seed).choice(rows, size=params.max_rows, replace=False))
    result.analysed_rows = len(picked)
    current, baseline = _frames(arrays, reference, picked)
    spread = reference.features.std(axis=0)
    tested = [name for name, std in zip(reference.feature_names, spread) if std > CONSTANT_STD]
    result.untested = [name for name in reference.feature_names if name not in tested]
    if not tested:
        result.status = "invalid"
        result.reasons.append("invalid reference: every feature column is constant in it")
        return result
    started = time.perf_counter()
    snapshot = run_report(current, baseline, tested, params)
    scores = _value_drift_scores(snapshot)
    result.seconds = round(time.perf_counter() - started, 3)
    if html is not None:
        snapshot.save_html(str(html))
    for name in tested:
        test = _column_test(params, name)
        result.features[name] = ColumnScore(test.method, test.threshold, scores[name], is_drifted(test, scores[name]))
    result.drift_share = len(result.drifted_features) / len(tested)
    result.dataset_drift = result.drift_share >= params.drift_share
    test = params.prediction_test
    result.prediction = ColumnScore(test.method, test.threshold, scores[PREDICTED], is_drifted(test, scores[PREDICTED]))
    _apply_rules(result, params)
    return result


def _apply_rules(result: WindowAnalysis, params: DriftParams) -> None:
    if result.dataset_drift:
        top = ", ".join(f"{name} {result.features[name].score:.3g}" for name in result.drifted_features[:5])
        result.reasons.append(f"feature drift: {result.drift_share:.0%} of features drifted "
                              f"(>= {params.drift_share:.0%}; {top})")
    if result.prediction is not None and result.prediction.drifted:
        result.reasons.append(f"prediction drift: {result.prediction.method} {result.prediction.score:.3g} "
                              f"(threshold {result.prediction.threshold:g})")
    if result.mean_confidence is not None and result.mean_confidence < params.min_mean_confidence:
        result.reasons.append(f"mean confidence {result.mean_confidence:.3f} < {params.min_mean_confidence}")
    if result.latency_p95_ms is not None and result.latency_p95_ms > params.max_latency_p95_ms:
        result.reasons.append(f"latency p95 {result.latency_p95_ms:.1f} ms > {params.max_latency_p95_ms} ms")
    result.status = "drift" if result.reasons else "ok"
