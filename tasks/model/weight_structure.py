"""What a converted model file holds of pruning and clustering, read back from the file itself (not from the Keras
model it came from), so a conversion that silently densifies or re-spreads the weights is caught.

Per constant weight tensor of rank >= 2 (kernels; biases are left out): its sparsity (exact zeros) and how many
distinct values it holds. An int8 tensor quantized per channel maps one float centroid to a different integer in
each channel, so its distinct values are counted per channel (along its quantized dimension) and the largest
count is reported; a float or per-tensor one is counted whole. A model clustered to N centroids shows at most
N (+1 for the zero its sparsity keeps) per layer; an unclustered int8 layer shows up to 255.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TFLITE_TYPES = {0: np.float32, 1: np.float16, 9: np.int8}  # schema TensorType: FLOAT32, FLOAT16, INT8


def _distinct(values: np.ndarray, axis: int | None) -> int:
    if axis is None or values.ndim < 2:
        return int(np.unique(values).size)
    moved = np.moveaxis(values, axis, 0).reshape(values.shape[axis], -1)
    return max(int(np.unique(row).size) for row in moved)


def _layer(name: str, values: np.ndarray, axis: int | None) -> dict[str, Any]:
    return {"tensor": name, "shape": list(values.shape), "zeros": int(np.count_nonzero(values == 0)),
            "size": int(values.size), "distinct_values": _distinct(values, axis)}


def tflite_weights(path: Path) -> list[dict[str, Any]]:
    """The kernel tensors stored in a .tflite file's buffers (the flatbuffer read directly)."""
    from tensorflow.lite.python import schema_py_generated as schema

    model = schema.Model.GetRootAsModel(Path(path).read_bytes(), 0)
    layers = []
    graph = model.Subgraphs(0)
    for index in range(graph.TensorsLength()):
        tensor = graph.Tensors(index)
        dtype = TFLITE_TYPES.get(tensor.Type())
        buffer = model.Buffers(tensor.Buffer())
        if dtype is None or tensor.ShapeLength() < 2 or buffer.DataLength() == 0:
            continue
        values = buffer.DataAsNumpy().view(dtype).reshape(tensor.ShapeAsNumpy())
        quantization = tensor.Quantization()
        axis = quantization.QuantizedDimension() if quantization and quantization.ScaleLength() > 1 else None
        layers.append(_layer(tensor.Name().decode(), values, axis))
    return layers


def onnx_weights(path: Path) -> list[dict[str, Any]]:
    """The kernel initializers of an .onnx file (int8 ones per output channel, as QDQ quantizes them)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    axes = {node.input[0]: next((attribute.i for attribute in node.attribute if attribute.name == "axis"), 1)
            for node in model.graph.node if node.op_type == "DequantizeLinear"}
    layers = []
    for initializer in model.graph.initializer:
        values = numpy_helper.to_array(initializer)
        if values.ndim < 2 or values.dtype not in (np.float32, np.float16, np.int8, np.uint8):
            continue
        axis = axes.get(initializer.name) if values.dtype in (np.int8, np.uint8) else None
        layers.append(_layer(initializer.name, values, axis))
    return layers


def weight_structure(path: Path) -> dict[str, Any]:
    """Sparsity and distinct values per kernel of the model file, with the file's totals."""
    layers = tflite_weights(path) if Path(path).suffix == ".tflite" else onnx_weights(path)
    total = sum(layer["size"] for layer in layers)
    return {"weight_sparsity": sum(layer["zeros"] for layer in layers) / total if total else 0.0,
            "max_distinct_weights": max((layer["distinct_values"] for layer in layers), default=0),
            "layers": layers}
