"""Drift check speed and detection, on this machine.

1. Time of one analysis (:func:`tasks.monitoring.analysis.analyse`: Evidently's ``DataDriftPreset`` over 32
   feature columns plus the predicted-class drift, HTML report rendered) for windows of 10k, 100k and 1M
   rows, against a 2,000-row reference. With the default ``drift.max_rows`` the statistical tests see at
   most 10,000 sampled rows of a window; the rules (confidence, latency p95) see every row.
2. Detection delay: digits windows of 300 rows shifted by :mod:`tasks.monitoring.simulate_drift` (brightness,
   noise and blur) at low, medium and high severity, after three undrifted windows, through the real trigger
   policy (``consecutive_windows`` 2, no cooldown): windows from the drift onset to the trigger (2 is the
   least the policy allows).
3. False triggers: 20 undrifted windows through the same policy.

The model answering in parts 2 and 3 is a scikit-learn logistic regression trained on the digits training
split (its probabilities feed the prediction-drift and confidence rules); latencies are a constant 5 ms,
not measured: latency is not what this benchmark is about.

    .venv/bin/python bench/drift.py [--quick]

Last line: ``drift_10k_s=<x> drift_100k_s=<x> drift_1m_s=<x> detect_windows_low=<n> detect_windows_medium=<n>
detect_windows_high=<n> false_triggers=<k>`` (a severity never detected within 10 windows prints ``none``).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from edge.features import features
from tasks.config import DriftParams
from tasks.monitoring.analysis import analyse
from tasks.monitoring.policy import DriftState, Verdict, decide
from tasks.monitoring.reference import Reference, build_reference
from tasks.monitoring.simulate_drift import DEFAULT_KINDS, simulate_window

FEATURES = 32
MAX_DELAY = 10
ONSET = 3  # undrifted windows before the drift starts


def synthetic_window(rows: int, rng: np.random.Generator, names: tuple[str, ...]) -> dict[str, np.ndarray]:
    return {"features": rng.normal(size=(rows, len(names))).astype(np.float32),
            "feature_names": np.array(names), "predicted": rng.integers(0, 10, rows).astype(np.int32),
            "confidence": rng.uniform(0.85, 1.0, rows).astype(np.float32),
            "latency_ms": rng.uniform(2.0, 8.0, rows).astype(np.float32), "device_id": np.array(["d"] * rows)}


def time_analysis(rows: int, rng: np.random.Generator, html: Path) -> float:
    names = tuple(f"f{index:02d}" for index in range(FEATURES))
    reference = Reference(rng.normal(size=(2000, FEATURES)).astype(np.float32), names,
                          rng.integers(0, 10, 2000).astype(np.int32), np.full(2000, 0.9, np.float32))
    window = synthetic_window(rows, rng, names)
    started = time.perf_counter()
    analyse(f"bench-{rows}", window, reference, DriftParams(), html=html)
    return time.perf_counter() - started


def digits_setup(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = (data.images / 16.0).astype(np.float32)[..., None]
    x_train, x_test, y_train, y_test = train_test_split(x, data.target, test_size=0.4, stratify=data.target,
                                                        random_state=seed)
    model = LogisticRegression(max_iter=2000).fit(x_train.reshape(len(x_train), -1), y_train)

    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return model.predict_proba(batch.reshape(len(batch), -1)).astype(np.float32), np.full(len(batch), 5.0,
                                                                                            np.float32)

    reference = build_reference(x_train, predict(x_train)[0], 2000, seed)
    return x_test, y_test, predict, reference


def run_policy(severities: list[str], x, y, predict, reference: Reference, rng: np.random.Generator
               ) -> list[bool]:
    params = DriftParams(consecutive_windows=2, cooldown_h=0)
    state, fired, now = DriftState(), [], time.time()
    for index, severity in enumerate(severities):
        window = simulate_window(x, y, predict, severity, DEFAULT_KINDS, rng, 300, now, now + 3600)
        arrays = {"features": features(window.x),
                  "feature_names": np.array(reference.feature_names), "predicted": window.predicted,
                  "confidence": window.confidence, "latency_ms": window.latency_ms,
                  "device_id": np.array(["sim"] * len(window.y))}
        analysis = analyse(f"w{index}", arrays, reference, params)
        verdict = Verdict(window_id=f"w{index}", at=now + index * 3600, status=analysis.status,
                          reasons=analysis.reasons)
        decision = decide(state, verdict, params, None)
        state = state.recorded(verdict, decision.fire)
        fired.append(decision.fire)
    return fired


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="skip the 1M-row window")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    html = Path("/tmp/edgeloop-bench-drift.html")
    time_analysis(1000, rng, html)  # imports and first-use costs out of the figures
    timings = {}
    for rows, label in ((10_000, "10k"), (100_000, "100k"), (1_000_000, "1m")):
        if label == "1m" and args.quick:
            continue
        timings[label] = time_analysis(rows, rng, html)
        print(f"analysis of {rows} rows x {FEATURES} features (tests on <= {DriftParams().max_rows} rows, HTML "
              f"rendered): {timings[label]:.2f} s", flush=True)
    x, y, predict, reference = digits_setup(0)
    delays = {}
    for severity in ("low", "medium", "high"):
        fired = run_policy(["none"] * ONSET + [severity] * MAX_DELAY, x, y, predict, reference, rng)
        early = any(fired[:ONSET])
        first = next((index for index, fire in enumerate(fired) if fire), None)
        delays[severity] = None if first is None or first < ONSET else first - ONSET + 1
        print(f"{severity}: fired before the onset: {early}; windows from onset to trigger: {delays[severity]}",
              flush=True)
    false_triggers = sum(run_policy(["none"] * 20, x, y, predict, reference, rng))
    print(f"false triggers on 20 undrifted windows: {false_triggers}")
    figures = " ".join(f"drift_{label}_s={seconds:.2f}" for label, seconds in timings.items())
    detection = " ".join(f"detect_windows_{sev}={'none' if d is None else d}" for sev, d in delays.items())
    print(f"{figures} {detection} false_triggers={false_triggers}")


if __name__ == "__main__":
    main()
