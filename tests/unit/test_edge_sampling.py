"""Device-side sampling: the feature function, the sampler, the bounded crash-safe store, the uploader."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import edge.sampling.sampler
import edge.sampling.store
from edge.errors import SampleStoreError, SamplingError, UploadError
from edge.features import BASE_FEATURES, feature_names, features
from edge.sampling.sampler import Sampler, SampleStore
from edge.sampling.segments import SampleRows, encode_rows
from edge.sampling.upload import FolderTarget, Uploader
from tests.conftest import REPO_ROOT
from tests.stack_helpers import wait_for

NPZ_DTYPES = {"features": np.float32, "confidence": np.float32, "predicted": np.int32, "latency_ms": np.float32,
              "timestamp": np.float64}
UNICODE_KEYS = ("feature_names", "model_version", "sample_id", "reason", "device_id")


def _rows(start: int, count: int, inputs: bool = False, shape: tuple[int, ...] = (8, 8, 1)) -> SampleRows:
    """Rows whose features and ids encode their index, so a test can tell exactly which ones survived."""
    index = np.arange(start, start + count)
    return SampleRows(
        features=np.repeat(index[:, None], len(BASE_FEATURES), axis=1).astype(np.float32),
        feature_names=BASE_FEATURES, confidence=np.full(count, 0.5, np.float32),
        predicted=(index % 10).astype(np.int32), reasons=("rate",) * count,
        sample_ids=tuple(f"{i:032x}" for i in index), latency_ms=3.5, model_version="v1", device_id="dev-1",
        timestamp=1.7e9, inputs=np.ones((count, *shape), np.float32) * index[:, None, None, None] if inputs else None)


def _load_all(store: SampleStore) -> dict[str, np.ndarray]:
    """Every closed file's arrays concatenated, oldest first."""
    loaded = []
    for path in store.closed_files():
        with np.load(path, allow_pickle=False) as archive:
            loaded.append({key: archive[key] for key in archive.files})
    return {key: np.concatenate([item[key] for item in loaded]) for key in loaded[0] if key != "feature_names"}


def _disk_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


# ---- features ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shape", "extra"), [((8, 8, 1), []), ((32, 32, 3), ["channel_mean_0", "channel_mean_1",
                                              "channel_mean_2"]), ((49, 10, 1), []), ((20,), []), ((8, 8), [])])
def test_features_have_one_named_float32_column_each(shape, extra, rng):
    batch = rng.random((5, *shape), dtype=np.float32)
    names = feature_names(shape)
    values = features(batch)
    assert names == [*BASE_FEATURES, *extra] and len(set(names)) == len(names)
    assert values.shape == (5, len(names)) and values.dtype == np.float32
    assert np.array_equal(values, features(batch.copy()))  # deterministic
    # a row does not depend on its batch (up to float32 rounding: BLAS sums a batch in another order)
    np.testing.assert_allclose(values[2:3], features(batch[2:3]), rtol=1e-5, atol=1e-6)


def test_feature_names_are_the_drift_reference_contract():
    assert BASE_FEATURES == (
        "mean", "std", "min", "max", "p05", "p50", "p95", "contrast", "saturated_low", "saturated_high",
        "gradient_energy_rows", "gradient_energy_cols", "centre_minus_border",
        "quadrant_mean_tl", "quadrant_mean_tr", "quadrant_mean_bl", "quadrant_mean_br")


@pytest.mark.parametrize("shape", [(8, 8, 1), (32, 32, 3), (20,), (1, 1, 1)])
def test_constant_inputs_give_finite_features(shape):
    values = dict(zip(feature_names(shape), features(np.full((2, *shape), 0.7, np.float32))[0]))
    assert all(np.isfinite(v) for v in values.values())
    assert values["std"] == 0 and values["contrast"] == 0 and values["gradient_energy_rows"] == 0
    assert values["saturated_low"] == values["saturated_high"] == 1.0
    # exact on every CPU: region means are summed in float64 (a float32 BLAS sum gave 0.7000091 on AVX-512)
    assert values["centre_minus_border"] == 0.0 and values["mean"] == np.float32(0.7)
    assert all(values[f"quadrant_mean_{q}"] == np.float32(0.7) for q in ("tl", "tr", "bl", "br"))


def test_features_measure_what_their_names_say(rng):
    sample = rng.random((1, 16, 16, 1), dtype=np.float32)
    flat = sample.reshape(-1)
    value = dict(zip(BASE_FEATURES, features(sample)[0]))
    assert value["mean"] == pytest.approx(flat.mean(), rel=1e-5) and value["std"] == pytest.approx(flat.std(), rel=1e-4)
    for name, q in (("p05", 5), ("p50", 50), ("p95", 95)):
        assert value[name] == pytest.approx(np.percentile(flat, q), rel=1e-5)
    assert (value["min"], value["max"]) == (flat.min(), flat.max())
    assert value["contrast"] == pytest.approx(value["p95"] - value["p05"])
    assert value["quadrant_mean_br"] == pytest.approx(sample[0, 8:, 8:].mean(), rel=1e-5)
    assert value["quadrant_mean_tr"] == pytest.approx(sample[0, :8, 8:].mean(), rel=1e-5)
    assert value["gradient_energy_rows"] == pytest.approx(np.mean(np.diff(sample, axis=1) ** 2), rel=1e-5)

    blurred = (sample + np.roll(sample, 1, axis=1) + np.roll(sample, 1, axis=2)) / 3
    occluded = sample.copy()
    occluded[0, 4:12, 4:12] = 0.0
    clipped = np.minimum(sample * 2, 1.0)
    lit_top_left = sample.copy()
    lit_top_left[0, :8, :8] += 1.0
    blur, occlusion, clip, lit = (dict(zip(BASE_FEATURES, features(x)[0]))
                                  for x in (blurred, occluded, clipped, lit_top_left))
    assert blur["gradient_energy_rows"] < value["gradient_energy_rows"] / 2
    assert blur["gradient_energy_cols"] < value["gradient_energy_cols"] / 2
    assert occlusion["centre_minus_border"] < value["centre_minus_border"] - 0.3
    assert clip["saturated_high"] > 0.4 > value["saturated_high"]
    assert lit["quadrant_mean_tl"] - lit["quadrant_mean_br"] > 0.8


def test_unsupported_shapes_are_refused():
    with pytest.raises(SamplingError, match="expected"):
        features(np.zeros((1, 2, 2, 2, 2)))


# ---- sampler -------------------------------------------------------------------------------------
def _confident(count: int, classes: int = 10) -> np.ndarray:
    probabilities = np.full((count, classes), 0.01 / (classes - 1), np.float32)
    probabilities[:, 3] = 0.99
    return probabilities


def test_sample_rate_keeps_its_share_and_only_confident_rows_by_rate(tmp_path, rng):
    store = SampleStore(tmp_path, budget_bytes=2**24, records_per_file=10_000)
    sampler = Sampler(store, "dev-1", sample_rate=0.05, seed=0)
    inputs = rng.random((100, 8, 8, 1), dtype=np.float32)
    kept = sum(sampler.offer(inputs, _confident(100), 2.0, "v1") for _ in range(200))
    assert sampler.offered_rows == 20_000 and sampler.kept_low_confidence == 0
    assert abs(kept / 20_000 - 0.05) < 4 * np.sqrt(0.05 * 0.95 / 20_000)
    assert kept == sampler.kept_by_rate == store.records_written


def test_low_confidence_rows_are_always_kept_with_their_reason(tmp_path, rng):
    store = SampleStore(tmp_path)
    sampler = Sampler(store, "dev-1", sample_rate=0.0, confidence_floor=0.85, seed=0)
    probabilities = _confident(6)
    probabilities[[1, 4]] = 0.1  # uniform over 10 classes: top 0.1 < 0.85
    assert sampler.offer(rng.random((6, 8, 8, 1)), probabilities, 12.5, "v7") == 2
    store.close_segment()
    saved = _load_all(store)
    assert list(saved["reason"]) == ["low_confidence"] * 2 and sampler.kept_low_confidence == 2
    assert np.allclose(saved["confidence"], 0.1) and list(saved["model_version"]) == ["v7", "v7"]
    assert np.allclose(saved["latency_ms"], 12.5) and list(saved["device_id"]) == ["dev-1", "dev-1"]


def test_non_kept_rows_cost_no_features(tmp_path, rng, monkeypatch):
    monkeypatch.setattr(edge.sampling.sampler, "features", lambda batch: pytest.fail("features of a row not kept"))
    sampler = Sampler(SampleStore(tmp_path), "dev-1", sample_rate=0.0)
    assert sampler.offer(rng.random((50, 8, 8, 1)), _confident(50), 1.0, "v1") == 0


@pytest.mark.parametrize(("arguments", "message"), [
    ({"sample_rate": -0.1}, "sample_rate"), ({"sample_rate": 1.5}, "sample_rate"),
    ({"confidence_floor": 2.0}, "confidence_floor"), ({"device_id": "bad/id"}, "device_id"),
    ({"device_id": ""}, "device_id")])
def test_sampler_parameters_are_validated(tmp_path, arguments, message):
    with pytest.raises(SamplingError, match=message):
        Sampler(SampleStore(tmp_path), **{"device_id": "dev-1", **arguments})


def test_store_parameters_are_validated(tmp_path):
    with pytest.raises(SampleStoreError, match="budget_bytes"):
        SampleStore(tmp_path, budget_bytes=1000)
    with pytest.raises(SampleStoreError, match="store_raw"):
        SampleStore(tmp_path, budget_bytes=2**16, store_raw=True).append(_rows(0, 1, inputs=True, shape=(64, 64, 3)))


@pytest.mark.parametrize("store_raw", [False, True])
def test_closed_files_hold_the_documented_arrays_and_raw_inputs_only_when_asked(tmp_path, rng, store_raw):
    store = SampleStore(tmp_path, store_raw=store_raw)
    inputs = rng.random((40, 8, 8, 1), dtype=np.float32)
    kept = Sampler(store, "dev-1", sample_rate=0.5, seed=1).offer(inputs, _confident(40), 3.0, "v1")
    closed = store.close_segment()
    with np.load(closed, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    assert ("x" in arrays) is store_raw
    assert set(arrays) - {"x"} == set(NPZ_DTYPES) | set(UNICODE_KEYS)
    assert all(arrays[key].dtype == dtype for key, dtype in NPZ_DTYPES.items())
    assert all(arrays[key].dtype.kind == "U" for key in UNICODE_KEYS)
    assert arrays["features"].shape == (kept, len(BASE_FEATURES)) and len(set(arrays["sample_id"])) == kept
    assert all(len(sample_id) == 32 for sample_id in arrays["sample_id"])
    if store_raw:
        assert any(np.array_equal(arrays["x"][0], row) for row in inputs)


# ---- store: rotation, budget, recovery -----------------------------------------------------------
def test_segments_rotate_by_count_age_and_schema(tmp_path):
    store = SampleStore(tmp_path, records_per_file=10, max_file_age_s=3600)
    store.append(_rows(0, 25))
    assert [store.records_in(path) for path in store.closed_files()] == [10, 10]
    assert store.maybe_rotate() is None  # 5 records, younger than an hour: stays open
    store.max_file_age_s = 1e-9
    assert store.maybe_rotate() is not None and len(store.closed_files()) == 3
    store.append(_rows(25, 2))
    store.append(_rows(27, 1, inputs=True))  # store_raw off: the inputs are dropped, same segment
    store.store_raw = True
    store.append(_rows(28, 1, inputs=True))  # other columns (x) start a segment of their own
    store.close_segment()
    names = [path.name for path in store.closed_files()]
    assert names == sorted(names) and [store.records_in(path) for path in store.closed_files()] == [10, 10, 5, 3, 1]
    assert list(_load_all(store)["features"][:, 0]) == list(range(29))


def test_disk_use_never_exceeds_the_budget_and_the_oldest_go_first(tmp_path, monkeypatch):
    budget = 32 * 1024
    peaks = []
    real_write = edge.sampling.store.atomic_write_bytes

    def write_and_measure(path, content):  # the temp file and the segment coexist right before the rename
        peaks.append(_disk_bytes(tmp_path) + len(content))
        real_write(path, content)

    monkeypatch.setattr(edge.sampling.store, "atomic_write_bytes", write_and_measure)
    store = SampleStore(tmp_path, budget_bytes=budget, records_per_file=16)
    for start in range(0, 3000, 7):
        store.append(_rows(start, 7))
        peaks.append(_disk_bytes(tmp_path))
        assert store.bytes_used == _disk_bytes(tmp_path)
    store.close_segment()
    assert max(peaks) <= budget and store.dropped_files > 10
    survivors = _load_all(store)["features"][:, 0].astype(int)
    assert len(survivors) == store.records_written - store.dropped_records
    assert list(survivors) == list(range(store.records_written - len(survivors), store.records_written))


def test_the_file_being_uploaded_is_evicted_last(tmp_path):
    store = SampleStore(tmp_path, budget_bytes=32 * 1024, records_per_file=16)
    store.append(_rows(0, 32))
    oldest, second = store.closed_files()
    with store.uploading(oldest) as present:
        store.append(_rows(32, 600))
        assert present and oldest.is_file() and not second.is_file() and store.dropped_files > 5
    store.append(_rows(632, 100))
    assert not oldest.is_file() and store.bytes_used == _disk_bytes(tmp_path) <= 32 * 1024


def test_a_torn_tail_is_dropped_and_every_whole_record_recovered(tmp_path):
    store = SampleStore(tmp_path, records_per_file=100)
    store.append(_rows(0, 5))
    segment = next((tmp_path / "open").glob("*.seg"))
    torn = encode_rows(_rows(5, 1))[0]
    with open(segment, "ab") as handle:
        handle.write(torn[:len(torn) // 2])

    reopened = SampleStore(tmp_path)
    assert reopened.recovered_records == 5 and reopened.torn_tail_bytes == len(torn) // 2
    assert not list((tmp_path / "open").iterdir())
    saved = _load_all(reopened)
    assert list(saved["sample_id"]) == [f"{i:032x}" for i in range(5)]
    assert np.array_equal(saved["features"][:, 3], np.arange(5, dtype=np.float32))


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from edge.sampling.sampler import SampleStore
    from tests.unit.test_edge_sampling import _rows
    store = SampleStore(Path(sys.argv[1]), records_per_file=64)
    for index in range(10**7):
        store.append(_rows(index, 1))
        if index % 50 == 0:
            print(index, flush=True)
""")


def test_records_survive_a_writer_killed_with_sigkill(tmp_path):
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], cwd=REPO_ROOT, stdout=subprocess.PIPE,
                              text=True)
    try:
        for line in writer.stdout:  # blocks until the writer reports progress, never longer than it runs
            if int(line) >= 400:
                break
    finally:
        writer.kill()
        writer.wait()
    store = SampleStore(tmp_path)
    indices = _load_all(store)["features"][:, 0].astype(int)
    assert len(indices) > 400 and store.recovered_records > 0
    assert list(indices) == list(range(len(indices)))  # contiguous from the first: nothing lost mid-stream
    saved = _load_all(store)
    assert list(saved["sample_id"]) == [f"{i:032x}" for i in indices]  # each record intact, not just present


# ---- upload --------------------------------------------------------------------------------------
class FlakyTarget:
    """Fails ``failures`` sends with the given error, then copies like a folder target."""

    def __init__(self, directory: Path, failures: int, permanent: bool = False) -> None:
        self.folder = FolderTarget(directory)
        self.failures = failures
        self.permanent = permanent
        self.sent: list[str] = []

    def send(self, path: Path) -> None:
        assert path.is_file(), "the uploader must not delete a file before the target confirmed it"
        if self.failures:
            self.failures -= 1
            raise UploadError("ingest down", permanent=self.permanent)
        self.folder.send(path)
        self.sent.append(path.name)


def _store_with_files(tmp_path: Path, files: int) -> SampleStore:
    store = SampleStore(tmp_path / "samples", records_per_file=4)
    store.append(_rows(0, 4 * files))
    return store


def test_folder_target_copies_atomically_and_confirms(tmp_path):
    store = _store_with_files(tmp_path, 1)
    source = store.closed_files()[0]
    FolderTarget(tmp_path / "out").send(source)
    FolderTarget(tmp_path / "out").send(source)  # a retry after a lost confirmation is harmless
    assert (tmp_path / "out" / source.name).read_bytes() == source.read_bytes()
    assert [path.name for path in (tmp_path / "out").iterdir()] == [source.name]
    (tmp_path / "blocked").write_text("a file where the folder should be")
    with pytest.raises(UploadError, match="cannot copy"):
        FolderTarget(tmp_path / "blocked").send(source)
    FolderTarget(tmp_path / "shared", "cam-7").send(source)  # a folder many devices share: named as ingest does
    assert [path.name for path in (tmp_path / "shared").iterdir()] == [f"cam-7--{source.name}"]


def test_uploader_deletes_only_confirmed_files_oldest_first(tmp_path):
    store = _store_with_files(tmp_path, 3)
    files = [path.name for path in store.closed_files()]
    target = FlakyTarget(tmp_path / "out", failures=2)
    uploader = Uploader(store, target, seed=0)
    assert uploader.upload_pending() == 0 and uploader.upload_pending() == 0
    assert [path.name for path in store.closed_files()] == files and uploader.failed_attempts == 2
    assert uploader.backlog_files == 3 and uploader.backlog_bytes == _disk_bytes(tmp_path / "samples" / "closed")
    assert uploader.upload_pending() == 3
    assert target.sent == files and store.closed_files() == [] and uploader.uploaded_records == 12
    assert uploader.consecutive_failures == 0 and uploader.last_error == "ingest down"


def test_paused_uploader_sends_nothing(tmp_path):
    store = _store_with_files(tmp_path, 2)
    hot = [True]
    uploader = Uploader(store, FlakyTarget(tmp_path / "out", failures=0), paused=lambda: hot[0])
    assert uploader.upload_pending() == 0 and uploader.paused_now and len(store.closed_files()) == 2
    hot[0] = False
    assert uploader.upload_pending() == 2 and not uploader.paused_now


def test_a_refused_file_is_set_aside_and_the_queue_moves_on(tmp_path):
    store = _store_with_files(tmp_path, 2)
    refused = store.closed_files()[0]
    uploader = Uploader(store, FlakyTarget(tmp_path / "out", failures=1, permanent=True))
    assert uploader.upload_pending() == 1
    assert (tmp_path / "samples" / "rejected" / refused.name).is_file() and uploader.rejected_files == 1
    assert store.bytes_used == _disk_bytes(tmp_path / "samples")


def test_backoff_doubles_to_its_cap_with_full_jitter(tmp_path):
    store = _store_with_files(tmp_path, 1)
    uploader = Uploader(store, FlakyTarget(tmp_path / "out", failures=10**6), initial_backoff_s=1.0,
                        max_backoff_s=8.0, poll_interval_s=30.0, seed=3)
    assert uploader.next_delay_s() == 30.0
    for failures, cap in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (7, 8.0)]:
        while uploader.consecutive_failures < failures:
            uploader.run_once()
        delays = [uploader.next_delay_s() for _ in range(300)]
        assert 0.0 <= min(delays) < 0.1 * cap and 0.9 * cap < max(delays) <= cap
        assert len(set(delays)) == 300  # jittered: no two clients retry in lockstep
    uploader.consecutive_failures = 100_000  # a device offline for weeks
    assert 0.0 <= uploader.next_delay_s() <= 8.0
    assert Uploader(store, uploader.target, seed=3).next_delay_s() == 5.0  # default poll interval


def test_uploader_thread_ships_traffic_and_stops(tmp_path, rng):
    store = SampleStore(tmp_path / "samples", records_per_file=8)
    sampler = Sampler(store, "dev-1", sample_rate=1.0, seed=0)
    uploader = Uploader(store, FolderTarget(tmp_path / "out"), poll_interval_s=0.01)
    uploader.start()
    try:
        sampler.offer(rng.random((40, 8, 8, 1)), _confident(40), 1.0, "v1")
        wait_for(lambda: uploader.uploaded_files == 5, 10, "five uploads", interval_s=0.01)
    finally:
        uploader.stop(timeout=5)
    assert not uploader.running and store.closed_files() == []
    shipped = [np.load(path, allow_pickle=False)["sample_id"] for path in sorted((tmp_path / "out").iterdir())]
    assert len(set(np.concatenate(shipped))) == 40


def test_device_modules_import_nothing_heavy():
    code = ("import sys, edge.features, edge.sampling.sampler, edge.sampling.segments, edge.sampling.upload; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('tensorflow', 'tf_keras', 'prefect', 'mlflow', 'tasks', 'fastapi', 'prometheus_client')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr
