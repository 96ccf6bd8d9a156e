"""The engine's fallback when the active model fails to invoke (a fault injected into a real loaded model)."""

from __future__ import annotations

import numpy as np
import pytest

from edge.serving.engine import InferenceEngine, ModelUnavailable
from edge.serving.metrics import Metrics
from edge.serving.thermal import ThermalMonitor
from edge.store.model_store import ModelStore


class Broken:
    """Stands in for a runtime that crashes on invoke (a delegate fault, an out-of-memory arena): no real
    model file can be made to load and then fail on a valid input on demand, so the failure is injected."""

    def predict(self, batch):
        raise RuntimeError("delegate crashed")


@pytest.fixture
def engine(tmp_path, bundle_kit):
    store = ModelStore(tmp_path / "store", bundle_kit.trusted_keys())
    store.install(bundle_kit.bundle("v1"))
    store.install(bundle_kit.bundle("v2", primary="onnx_int8"))
    engine = InferenceEngine(store, Metrics(), ThermalMonitor(tmp_path / "no-sensor"))
    assert engine.reload() == "v2"
    yield engine
    engine.close()


def test_an_invoke_failure_is_answered_by_the_previous_version(engine, digits):
    object.__setattr__(engine.active, "primary", Broken())
    prediction = engine.predict(digits.x[:4])
    assert prediction.version.version == "v1" and prediction.fallback.startswith("v2 failed: RuntimeError")
    assert prediction.scores.shape == (4, 10) and np.all(np.isfinite(prediction.scores))
    assert engine.metrics.fallbacks.labels("invoke_failed")._value.get() == 1


def test_with_no_working_version_the_engine_says_unavailable(engine, digits):
    object.__setattr__(engine.active, "primary", Broken())
    object.__setattr__(engine.previous(), "primary", Broken())
    with pytest.raises(ModelUnavailable, match="both the active and the previous version failed"):
        engine.predict(digits.x[:1])


def test_a_missing_thermal_sensor_reads_as_unknown_and_normal(tmp_path):
    monitor = ThermalMonitor(tmp_path / "absent", limit_c=70.0)
    assert monitor.refresh() == "normal" and monitor.temperature_c is None
    sensor = tmp_path / "temp"
    for millidegrees, state in (("59000", "normal"), ("61000", "soft"), ("68500", "hard"), ("40000", "normal")):
        sensor.write_text(millidegrees)
        monitor = ThermalMonitor(sensor, limit_c=70.0, soft_margin_c=10.0, hard_margin_c=2.0)
        assert monitor.refresh() == state
