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


def _device_samples(directory, confidence: float, rows: int, store_raw: bool = False):
    """Closed sample files exactly as a device writes them (edge.samples), in ``directory``."""
    from edge.samples import Sampler, SampleStore

    store = SampleStore(directory.parent / f"store-{directory.name}", store_raw=store_raw)
    probabilities = np.full((rows, 10), (1.0 - confidence) / 9, np.float32)
    probabilities[:, 0] = confidence
    Sampler(store, "dev-1", sample_rate=1.0, seed=0).offer(np.zeros((rows, 8, 8, 1)), probabilities, 350.0, "v1")
    directory.mkdir(exist_ok=True)
    (directory / "dev-1--samples.npz").write_bytes(store.close_segment().read_bytes())


@pytest.mark.parametrize(("confidence", "detected"), [(0.95, False), (0.6, True)])
def test_device_sample_files_count_and_feed_the_rule(tmp_path, confidence, detected):
    _device_samples(tmp_path / "c", confidence, 60)
    summary = summarise(DriftParams(collected_dir=tmp_path / "c", max_latency_p95_ms=1000.0))
    assert summary.samples == 60 and summary.mean_confidence == pytest.approx(confidence)
    assert summary.latency_p95_ms == pytest.approx(350.0) and summary.drift_detected is detected


def test_device_files_with_and_without_inputs_and_older_uploads_add_up(tmp_path):
    _device_samples(tmp_path / "c", 0.9, 30)
    _device_samples(tmp_path / "raw", 0.9, 20, store_raw=True)
    (tmp_path / "raw" / "dev-1--samples.npz").rename(tmp_path / "c" / "dev-1--raw.npz")
    _upload(tmp_path / "c", "old.npz", x=np.zeros((25, 8, 8, 1)), confidence=np.full(25, 0.9))
    summary = summarise(DriftParams(collected_dir=tmp_path / "c"))
    assert (summary.files, summary.samples) == (3, 75)
