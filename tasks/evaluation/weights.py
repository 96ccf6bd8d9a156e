"""Weight bytes of a model file: the constant tensors, without the container's fixed overhead.

A small model's ``.tflite`` flatbuffer carries tens of KiB of graph, operator and metadata records
whatever its precision, so its int8 file can be only 2x smaller than float32 although every weight
shrank 4x. The size gate compares weight bytes: the sum of the TFLite buffers (constant tensor data)
or of the ONNX initializers.
"""

from __future__ import annotations

from pathlib import Path

MODEL_BUFFERS_FIELD = 4  # tflite schema: table Model { version, operator_codes, subgraphs, description, buffers }
BUFFER_DATA_FIELD, BUFFER_SIZE_FIELD = 0, 2  # table Buffer { data: [ubyte], offset: ulong, size: ulong }


def _field_offset(field_index: int) -> int:
    return 4 + 2 * field_index  # a flatbuffer vtable: two uint16 headers, then one uint16 per field


def tflite_weight_bytes(content: bytes) -> int:
    """Sum of the data of every buffer in a ``.tflite`` flatbuffer (large models: the size field)."""
    from flatbuffers import encode, number_types
    from flatbuffers.table import Table

    model = Table(bytearray(content), encode.Get(number_types.UOffsetTFlags.packer_type, content, 0))
    buffers = model.Offset(_field_offset(MODEL_BUFFERS_FIELD))
    if not buffers:
        return 0
    total, start = 0, model.Vector(buffers)
    for index in range(model.VectorLen(buffers)):
        buffer = Table(model.Bytes, model.Indirect(start + 4 * index))
        data = buffer.Offset(_field_offset(BUFFER_DATA_FIELD))
        if data:
            total += buffer.VectorLen(data)
        elif size := buffer.Offset(_field_offset(BUFFER_SIZE_FIELD)):
            total += buffer.Get(number_types.Uint64Flags, size + buffer.Pos)
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
