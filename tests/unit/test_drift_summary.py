import numpy as np
import pytest

from tasks.config import DriftParams
from tasks.errors import DataError
from tasks.monitoring.drift import summarise


def _upload(directory, name, **arrays):
    directory.mkdir(exist_ok=True)
    np.savez(directory / name, **arrays)


@pytest.mark.parametrize(
    ("confidence", "latency", "detected", "reason"),
    [(0.95, 20.0, False, None), (0.70, 20.0, True, "mean confidence 0.700 < 0.85"),
     (0.95, 350.0, True, "latency p95 350.0 ms > 200.0 ms")],
)
def test_retraining_rule(tmp_path, confidence, latency, detected, reason):
    _upload(tmp_path / "c", "a.npz", x=np.zeros((60, 8, 8, 1)), confidence=np.full(60, confidence),
            latency_ms=np.full(60, latency))
    summary = summarise(DriftParams(collected_dir=tmp_path / "c"))
    assert summary.samples == 60 and summary.drift_detected is detected
    if reason:
        assert reason in summary.reasons


def test_too_few_samples_give_no_verdict(tmp_path):
    _upload(tmp_path / "c", "a.npz", x=np.zeros((5, 8, 8, 1)), confidence=np.full(5, 0.1))
    summary = summarise(DriftParams(collected_dir=tmp_path / "c"))
    assert not summary.drift_detected and "no verdict" in summary.reasons[0]


def test_corrupt_upload_is_named(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="bad.npz is unreadable"):
        summarise(DriftParams(collected_dir=tmp_path / "c"))
