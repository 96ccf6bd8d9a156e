import json
import subprocess
import sys

import numpy as np
import pytest

from edge.runtime import EdgeModel, InferenceError, ModelLoadError, TensorInfo, dequantize, quantize
from edge.sidecar import SidecarError, read_sidecar, verify_model_file, write_sidecar
from tests.conftest import REPO_ROOT


def test_edge_never_imports_control_plane_packages():
    """Every device module loads without the control plane; the Prefect flow a device's worker runs is the one
    module that needs Prefect (it imports nothing else of the project), and ``__main__`` modules run on import."""
    modules = sorted(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)
                     for path in (REPO_ROOT / "edge").rglob("*.py")
                     if path.stem not in ("__init__", "__main__") and path.name != "prefect_flow.py")
    assert {"edge.serving.app", "edge.store.model_store", "edge.sampling.upload", "edge.updater.daemon"} <= set(modules)
    code = (f"import sys, {', '.join(modules)}; "
            "heavy = [m for m in ('tensorflow', 'tf_keras', 'prefect', 'mlflow', 'tensorflow_model_optimization') "
            "if m in sys.modules or m.startswith('tasks')] + [m for m in sys.modules if m.split('.')[0] == 'tasks']; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0, completed.stdout + completed.stderr


def test_quantize_roundtrip_within_half_a_step():
    info = TensorInfo("x", (-1, 4), "int8", scale=0.05, zero_point=-3)
    values = np.array([-7.0, -0.1, 0.0, 0.26, 7.0], np.float32)
    quantized = quantize(values, info)
    assert quantized.dtype == np.int8
    assert quantized[0] == -128 and quantized[-1] == 127  # clipped, not wrapped
    inside = slice(1, 4)
    assert np.allclose(dequantize(quantized, info)[inside], values[inside], atol=info.scale / 2 + 1e-6)


@pytest.mark.parametrize("variant", ["tflite_fp32", "tflite_int8", "onnx_fp32", "onnx_int8"])
def test_runtime_matches_keras(variant, tiny_model, tiny_model_files, digits):
    model = EdgeModel.load(tiny_model_files[variant])
    batch = digits.x[600:800]
    expected = tiny_model.predict(batch, verbose=0)
    outputs = model.predict(batch, batch_size=37)  # uneven batches exercise the resize path
    assert outputs.shape == expected.shape and outputs.dtype == np.float32
    difference = np.abs(outputs - expected)
    if variant.endswith("fp32"):
        noise = 1e-4  # another summation order than Keras': ~3e-7 measured
        assert np.max(difference) < noise
    else:  # int8: quantization noise, small on average; a borderline sample may move more
        noise = 0.05  # ~3x the largest int8 error measured (0.018)
        assert np.mean(difference) < 0.02
    # The top class must agree wherever Keras' top-2 margin is clearly above that noise. A near-tie may flip
    # with the CPU's rounding (AVX2, AVX-512), so it is not judged, but such samples must be few.
    top_two = np.sort(expected, axis=1)[:, -2:]
    clear = top_two[:, 1] - top_two[:, 0] > 2 * noise
    assert np.mean(clear) > 0.8, "the reference model has too few clear samples to compare the runtimes on"
    np.testing.assert_array_equal(outputs.argmax(1)[clear], expected.argmax(1)[clear])


def test_int8_tflite_reports_quantized_io(tiny_model_files):
    model = EdgeModel.load(tiny_model_files["tflite_int8"])
    assert model.input.dtype == "int8" and model.input.quantized and model.input.scale > 0
    assert model.output.dtype == "int8" and model.output.quantized


def test_corrupt_truncated_unknown_and_missing_files(tmp_path, tiny_model_files):
    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="corrupt.tflite: not a loadable tflite model"):
        EdgeModel.load(corrupt)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(tiny_model_files["onnx_fp32"].read_bytes()[:200])
    with pytest.raises(ModelLoadError, match="not a loadable onnx model"):
        EdgeModel.load(truncated)
    with pytest.raises(ModelLoadError, match="unknown model format"):
        EdgeModel.load(tmp_path / "model.pt")
    with pytest.raises(ModelLoadError, match="not found"):
        EdgeModel.load(tmp_path / "absent.tflite")


def test_wrong_input_shape_and_dtype(tiny_model_files):
    model = EdgeModel.load(tiny_model_files["tflite_fp32"])
    with pytest.raises(InferenceError, match="does not match"):
        model.predict(np.zeros((2, 9, 9, 1), np.float32))
    with pytest.raises(InferenceError, match="not numeric"):
        model.predict(np.array([[["a"] * 1] * 8] * 8, dtype=object)[np.newaxis])


def test_sidecar_roundtrip_and_tamper_detection(tmp_path, tiny_model_files):
    model_file = tmp_path / "m.tflite"
    model_file.write_bytes(tiny_model_files["tflite_int8"].read_bytes())
    write_sidecar(model_file, {"variant": "tflite_int8", "labels": ["0", "1"]})
    record = verify_model_file(model_file)
    assert record["variant"] == "tflite_int8" and record["size_bytes"] == model_file.stat().st_size
    data = bytearray(model_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_file.write_bytes(bytes(data))
    with pytest.raises(SidecarError, match="does not match its sidecar"):
        verify_model_file(model_file)
    with pytest.raises(SidecarError, match="does not match its sidecar"):  # the runtime refuses to run it
        EdgeModel.load(model_file)
    (tmp_path / "m.tflite.json").write_text("{not json")
    with pytest.raises(SidecarError, match="not valid JSON"):
        read_sidecar(model_file)
    with pytest.raises(SidecarError, match="no metadata sidecar"):
        read_sidecar(tmp_path / "other.tflite")


def test_measure_module_reports_memory(tiny_model_files):
    completed = subprocess.run([sys.executable, "-m", "edge.bench.measure", str(tiny_model_files["tflite_fp32"])],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    figures = json.loads(completed.stdout.strip().splitlines()[-1])
    assert figures["peak_rss_bytes"] > figures["model_rss_bytes"] >= 0


def test_the_u8s8_reduce_range_scheme_quantizes_activations_unsigned_and_still_agrees(tiny_model, tiny_model_files,
                                                                                     digits, tmp_path):
    """ONNX Runtime's advice for x86 without VNNI (bench/int8_speedup.py measures it against S8S8): the model's
    activations become uint8, its weights int8 in 7 bits, and its labels agree with float32 like S8S8's do."""
    import onnx

    from tasks.model.exporters import onnx_int8_bytes

    fp32 = tiny_model_files["onnx_fp32"].read_bytes()
    path = tmp_path / "u8s8.onnx"
    path.write_bytes(onnx_int8_bytes(fp32, digits.x[:50], "u8s8_reduce_range"))
    graph = onnx.load(str(path)).graph
    zero_points = {init.name: onnx.numpy_helper.to_array(init) for init in graph.initializer
                   if init.name.endswith("zero_point")}
    activation_dtypes = {array.dtype.name for name, array in zero_points.items() if array.ndim == 0}
    assert "uint8" in activation_dtypes, activation_dtypes
    weights = [onnx.numpy_helper.to_array(init) for init in graph.initializer if init.data_type == onnx.TensorProto.INT8
               and onnx.numpy_helper.to_array(init).ndim > 1]
    assert weights and all(np.abs(w.astype(np.int16)).max() <= 64 for w in weights)  # reduce_range: 7-bit weights
    x = digits.x[200:300]
    expected = np.asarray(tiny_model(x)).argmax(axis=1)
    agreement = float(np.mean(EdgeModel.load(path, verify=False).predict(x).argmax(axis=1) == expected))
    assert agreement >= 0.9, agreement


def test_the_16x8_variant_keeps_float_io_int16_activations_and_the_labels(tiny_model, digits, tmp_path):
    """LiteRT's 16x8 mode (tasks.model.exporters, variant tflite_int16x8): float32 in and out, int16 activations
    and int8 weights inside, and the labels of the float model."""
    from ai_edge_litert.interpreter import Interpreter

    from tasks.model.exporters import tflite_bytes

    path = tmp_path / "int16x8.tflite"
    path.write_bytes(tflite_bytes(tiny_model, "int16x8", digits.x[:50]))
    model = EdgeModel.load(path, verify=False)
    assert model.input.dtype == "float32" and model.output.dtype == "float32"
    dtypes = {detail["dtype"].__name__ for detail in Interpreter(model_path=str(path)).get_tensor_details()}
    assert {"int16", "int8"} <= dtypes, dtypes
    x = digits.x[200:300]
    expected = np.asarray(tiny_model(x)).argmax(axis=1)
    assert float(np.mean(model.predict(x).argmax(axis=1) == expected)) >= 0.95
