"""The variant table: every export target as data (name, file suffix, runtime, source model, precision).

Adding a variant is a row here plus, if it needs a new format, an exporter in :mod:`tasks.model.exporters`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Variant:
    name: str
    suffix: str
    runtime: str  # the runtime that runs it on a device: tflite (LiteRT) or onnx (ONNX Runtime)
    source: str  # which trained Keras model: baseline | qat | pruned_int8 | clustered_int8 | pruned_clustered_int8
    precision: str  # fp32 | fp16 | dynamic | int8 | int16x8 (int16 activations, int8 weights)
    description: str
    onnx_scheme: str = "s8s8"  # ONNX int8: s8s8 | u8s8_reduce_range (tasks.model.exporters.onnx_int8_bytes)

    def filename(self) -> str:
        return f"{self.name}{self.suffix}"


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant("tflite_fp32", ".tflite", "tflite", "baseline", "fp32", "float32 reference"),
        Variant("tflite_fp16", ".tflite", "tflite", "baseline", "fp16", "float16 weights"),
        Variant("tflite_dynamic", ".tflite", "tflite", "baseline", "dynamic", "dynamic-range int8 weights"),
        Variant("tflite_int8", ".tflite", "tflite", "baseline", "int8", "full-integer PTQ, int8 I/O"),
        Variant("tflite_int8_qat", ".tflite", "tflite", "qat", "int8", "quantization-aware trained, int8 I/O"),
        Variant("tflite_int8_pruned", ".tflite", "tflite", "pruned_int8", "int8", "pruned + int8 (PQAT or PTQ)"),
        Variant("tflite_int8_clustered", ".tflite", "tflite", "clustered_int8", "int8", "weight-clustered + int8 "
                "(CQAT or PTQ)"),
        Variant("tflite_int8_pruned_clustered", ".tflite", "tflite", "pruned_clustered_int8", "int8",
                "pruned, sparsity-preserving clustered + int8 (PCQAT or PTQ)"),
        Variant("tflite_int16x8", ".tflite", "tflite", "baseline", "int16x8", "16x8 PTQ: int16 activations, int8 "
                "weights, float I/O"),
        Variant("onnx_fp32", ".onnx", "onnx", "baseline", "fp32", "tf2onnx float32"),
        Variant("onnx_int8", ".onnx", "onnx", "baseline", "int8", "ONNX Runtime static QDQ, per-channel"),
        Variant("onnx_int8_u8s8", ".onnx", "onnx", "baseline", "int8", "static QDQ, uint8 activations, reduce_range "
                "(x86 without VNNI)", onnx_scheme="u8s8_reduce_range"),
    )
}

REFERENCE_VARIANT = "tflite_fp32"
