"""Weight bytes of a model file: the constant tensors, without the container's fixed overhead.

A small model's ``.tflite`` flatbuffer carries tens of KiB of graph, operator and metadata records
whatever its precision, so its int8 file can be only 2x smaller than float32 although every weight
shrank 4x. The size gate compares weight bytes: the sum of the TFLite buffers (constant tensor data)
or of the ONNX initializers.
"""

from __future__ import annotations

from pathlib import Path


def tflite_weight_bytes(content: bytes) -> int:
    """Sum of the data of every buffer in a ``.tflite`` flatbuffer (large models: the size field).

    Read through the schema LiteRT generates (a light import, unlike TensorFlow's copy of it). A model
    over 2 GB keeps its buffers after the flatbuffer: such a buffer has no data, only its offset and size.
    """
    from ai_edge_litert.schema_py_generated import Model

    model = Model.GetRootAs(content, 0)
    total = 0
    for index in range(model.BuffersLength()):
        buffer = model.Buffers(index)
        total += buffer.Size() if buffer.DataIsNone() else buffer.DataLength()
    return total


def onnx_weight_bytes(path: Path) -> int:
    """Sum of the ONNX graph's initializers (weights, biases, quantization scales and zero points)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    return int(sum(numpy_helper.to_array(tensor).nbytes for tensor in model.graph.initializer))


def weight_bytes(path: Path) -> int:
    """Constant-tensor bytes of a ``.tflite`` or ``.onnx`` model file."""
    return tflite_weight_bytes(path.read_bytes()) if path.suffix == ".tflite" else onnx_weight_bytes(path)
