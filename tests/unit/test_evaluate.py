import numpy as np
import pytest

from edge.sidecar import write_sidecar
from tasks.config import EvaluateParams, GateParams
from tasks.contracts import Evaluation, VariantRow
from tasks.evaluation.evaluate import measure_variant
from tasks.evaluation.gates import apply_gates, gate_failure_message, recommend
from tasks.evaluation.report import comparison_markdown, pareto_front

GATES = GateParams(min_accuracy=0.9, max_accuracy_drop_pts=1.0, min_weight_reduction=3.0, max_host_latency_ms=10.0)


def _row(name, drop=0.2, reduction=4.0, p95=1.0, size=100, gzip=90, accuracy=0.98, status="ok", file_reduction=2.0):
    return VariantRow(variant=name, status=status, accuracy=accuracy, accuracy_drop_pts=drop,
                      weight_reduction=reduction, size_reduction=file_reduction, latency_p95_ms=p95, size_bytes=size,
                      gzip_bytes=gzip)


@pytest.mark.parametrize(
    ("row", "passed", "message"),
    [
        (_row("a"), True, None),
        (_row("a", drop=1.5), False, "accuracy drop 1.50pts > max 1.0pts (over by 0.50pts)"),
        (_row("a", reduction=2.0), False, "weight reduction 2.00x < min 3.0x (short by 1.00x)"),
        (_row("a", accuracy=0.62, drop=0.0), False, "accuracy 0.62 < min 0.9 (short by 0.28)"),
        (_row("a", p95=12.0), False, "host p95 latency 12.00ms > max 10.0ms (over by 2.00ms)"),
        (_row("a", status="failed"), False, "not evaluated (failed)"),
    ],
)
def test_gates_mark_pass_fail_with_margin(row, passed, message):
    apply_gates(row, GATES)
    assert row.gates_passed is passed
    if message:
        assert message in row.gate_failures


def test_recommendation_by_each_criterion():
    rows = [_row("small", size=50, gzip=45, p95=3.0, accuracy=0.97), _row("fast", size=80, gzip=20, p95=0.5),
            _row("accurate", size=90, gzip=80, p95=2.0, accuracy=0.99), _row("failing", size=1, gzip=1, drop=5.0)]
    for row in rows:
        apply_gates(row, GATES)
    assert recommend(rows, "size").variant == "small"
    assert recommend(rows, "gzip_size").variant == "fast"
    assert recommend(rows, "latency").variant == "fast"
    assert recommend(rows, "accuracy").variant == "accurate"
    assert recommend([rows[-1]], "size") is None
    for row, bundle in zip(rows, (60, 30, 10, 1), strict=True):
        row.bundle_bytes = bundle
    assert recommend(rows, "bundle_bytes").variant == "accurate"  # the fewest bytes per device among passing


def test_bundle_and_fleet_bytes_are_measured_from_the_file_and_the_fleet(tmp_path, tiny_model_files):
    """bundle_bytes: the file and its sidecar gzipped; fleet bytes: that times the fleet file's devices."""
    import shutil

    import yaml

    from tasks.evaluation.evaluate import bundle_bytes, fleet_devices

    model = tmp_path / "m.tflite"
    shutil.copy(tiny_model_files["tflite_int8"], model)
    write_sidecar(model, {"variant": "tflite_int8"})
    assert 0 < bundle_bytes(model) < model.stat().st_size + 2048
    fleet = tmp_path / "fleet.yaml"
    assert fleet_devices(fleet) is None  # no fleet file: no column
    fleet.write_text(yaml.safe_dump({"devices": {f"d{i}": {"group": "lab"} for i in range(7)}}))
    assert fleet_devices(fleet) == 7
    fleet.write_text("devices: [unclosed")
    assert fleet_devices(fleet) is None


def test_no_passing_variant_message_names_every_gate_and_margin():
    rows = [_row("a", drop=3.0), _row("b", reduction=1.0)]
    for row in rows:
        apply_gates(row, GATES)
    message = gate_failure_message(rows, GATES)
    assert "a: accuracy drop 3.00pts > max 1.0pts (over by 2.00pts)" in message
    assert "b: weight reduction 1.00x < min 3.0x (short by 2.00x)" in message
    assert "min accuracy 0.9" in message and "size reduction (x)" not in message  # the file-size gate is off


def test_the_file_size_gate_is_optional_and_judged_when_set():
    row = _row("small-model-int8", reduction=3.9, file_reduction=2.09)  # ds_cnn: honest int8, 2.09x smaller file
    apply_gates(row, GATES)
    assert row.gates_passed
    strict = _row("small-model-int8", reduction=3.9, file_reduction=2.09)
    apply_gates(strict, GATES.model_copy(update={"min_size_reduction": 3.0}))
    assert "size reduction 2.09x < min 3.0x (short by 0.91x)" in strict.gate_failures


def test_pareto_front():
    points = [("a", 1.0, 0.90), ("b", 2.0, 0.95), ("c", 3.0, 0.94), ("d", 1.0, 0.85)]
    assert pareto_front(points) == {"a", "b"}


def test_measure_variant_in_device_runtime(tiny_model, tiny_model_files, digits, tmp_path):
    model_file = tmp_path / "tflite_int8.tflite"
    model_file.write_bytes(tiny_model_files["tflite_int8"].read_bytes())
    write_sidecar(model_file, {"sparsity": 0.0})
    test_x, test_y = digits.x[1000:1200], digits.y[1000:1200]
    from tasks.contracts import Dataset

    reference = tiny_model.predict(test_x, verbose=0)
    reference_accuracy = float(np.mean(reference.argmax(1) == test_y))
    figures = measure_variant(model_file, Dataset(test_x, test_y, digits.labels), reference, reference_accuracy,
                              EvaluateParams(latency_warmup_runs=2, latency_runs=10))
    assert figures["agreement"] > 0.9
    assert figures["accuracy_drop_pts"] == pytest.approx(100 * (reference_accuracy - figures["accuracy"]))
    assert 0 < figures["gzip_bytes"] and figures["size_bytes"] == model_file.stat().st_size
    assert 0 < figures["latency_p50_ms"] <= figures["latency_p95_ms"]
    # a corrupted file is caught by its sidecar before it is ever run
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF
    model_file.write_bytes(bytes(data))
    from edge.sidecar import SidecarError

    with pytest.raises(SidecarError):
        measure_variant(model_file, Dataset(test_x, test_y, digits.labels), reference, reference_accuracy,
                        EvaluateParams(latency_warmup_runs=0, latency_runs=5))


def test_markdown_lists_skipped_rows_with_reason():
    row = VariantRow(variant="tflite_int8_qat", status="skipped", error="no QAT model: strategy ptq")
    apply_gates(row, GATES)
    text = comparison_markdown(Evaluation(rows=[row], recommended=None, recommend_by="size", gates={}))
    assert "`tflite_int8_qat`: skipped: no QAT model: strategy ptq" in text
