"""One small exporter per target format: Keras model (or ONNX file) in, model bytes out.

They know nothing about files, sidecars or timing; :mod:`tasks.model.convert` wraps them all alike.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tasks.model.tfsetup import tensorflow

ONNX_INPUT_NAME = "input"


def _representative(samples: np.ndarray):
    def generator():
        for index in range(len(samples)):
            yield [samples[index:index + 1].astype(np.float32)]

    return generator


def tflite_bytes(model: Any, precision: str, representative: np.ndarray | None = None) -> bytes:
    """Convert a Keras model to a .tflite flatbuffer.

    Args:
        precision: ``fp32`` (no optimisation), ``fp16`` (float16 weights), ``dynamic`` (int8 weights,
            float activations), ``int8`` (full-integer, int8 input/output, calibrated on
            ``representative``; QAT models carry their own ranges but calibration is harmless) or
            ``int16x8`` (LiteRT's 16x8 mode: int16 activations, int8 weights, calibrated; float input/output:
            the usual answer when int8 activations cost too much accuracy, at a speed cost).
    """
    tf = tensorflow()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    if precision == "fp32":
        return converter.convert()
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if precision == "fp16":
        converter.target_spec.supported_types = [tf.float16]
    elif precision == "int8":
        if representative is None or len(representative) == 0:
            raise ValueError("full-integer int8 conversion needs a representative dataset")
        converter.representative_dataset = _representative(representative)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        converter.inference_input_type = tf.int8
        converter.inference_output_type = tf.int8
    elif precision == "int16x8":
        if representative is None or len(representative) == 0:
            raise ValueError("16x8 conversion needs a representative dataset")
        converter.representative_dataset = _representative(representative)
        ops = tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8
        converter.target_spec.supported_ops = [ops]
    elif precision != "dynamic":
        raise ValueError(f"unknown TFLite precision {precision!r}")
    return converter.convert()


def onnx_bytes(model: Any, opset: int) -> bytes:
    """Convert a Keras model to ONNX with tf2onnx, from an explicit input signature (batch dim free)."""
    tf = tensorflow()
    import tf2onnx

    shape = [None, *model.input_shape[1:]]
    signature = [tf.TensorSpec(shape, tf.float32, name=ONNX_INPUT_NAME)]
    proto, _ = tf2onnx.convert.from_keras(model, input_signature=signature, opset=opset)
    return proto.SerializeToString()


OnnxInt8Scheme = Literal["s8s8", "u8s8_reduce_range"]


def onnx_int8_bytes(onnx_fp32: bytes, representative: np.ndarray, scheme: OnnxInt8Scheme = "s8s8") -> bytes:
    """Static QDQ int8 quantization with ONNX Runtime: per-channel weights, calibrated activations.

    ``s8s8``: signed activations and weights (the default; fast where the CPU has VNNI). ``u8s8_reduce_range``:
    unsigned activations, signed 7-bit weights, which ONNX Runtime's documentation advises for x86 CPUs without
    VNNI (U8S8 with full-range weights can saturate in their ``vpmaddubsw``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class RepresentativeReader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(representative[i:i + 1].astype(np.float32) for i in range(len(representative)))

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {ONNX_INPUT_NAME: batch}

    with tempfile.TemporaryDirectory(prefix="edgeloop-onnx-") as workdir:
        source, prepared, quantized = (Path(workdir) / name for name in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        source.write_bytes(onnx_fp32)
        quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
        activations = QuantType.QInt8 if scheme == "s8s8" else QuantType.QUInt8
        quantize_static(str(prepared), str(quantized), RepresentativeReader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=activations, weight_type=QuantType.QInt8,
                        reduce_range=scheme == "u8s8_reduce_range")
        return quantized.read_bytes()
