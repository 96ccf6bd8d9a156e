"""Shared fixtures: tiny real data and tiny real models, built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def digits():
    """The bundled digits data (real, tiny) as a tasks.data.Dataset."""
    from tasks.data import load_sklearn_digits

    return load_sklearn_digits()


@pytest.fixture(scope="session")
def tiny_model(digits):
    """A small float32 Keras model trained for two epochs on 600 digits (seeded)."""
    import tf_keras as keras

    from tasks import optimize
    from tasks.tfsetup import set_seeds

    set_seeds(0)
    inputs = keras.Input(digits.input_shape)
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    outputs = keras.layers.Dense(10, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    optimize.compile_model(model, 1e-2)
    model.fit(digits.x[:600], digits.y[:600], epochs=2, batch_size=32, verbose=0)
    return model


@pytest.fixture(scope="session")
def tiny_model_files(tiny_model, digits, tmp_path_factory) -> dict[str, Path]:
    """The tiny model exported as tflite fp32/int8 and onnx fp32/int8 files."""
    from tasks import exporters

    out = tmp_path_factory.mktemp("tiny_models")
    representative = digits.x[:50]
    onnx_fp32 = exporters.onnx_bytes(tiny_model, 17)
    contents = {
        "tflite_fp32.tflite": exporters.tflite_bytes(tiny_model, "fp32"),
        "tflite_int8.tflite": exporters.tflite_bytes(tiny_model, "int8", representative),
        "onnx_fp32.onnx": onnx_fp32,
        "onnx_int8.onnx": exporters.onnx_int8_bytes(onnx_fp32, representative),
    }
    paths = {}
    for name, content in contents.items():
        (out / name).write_bytes(content)
        paths[name.split(".")[0]] = out / name
    return paths


@pytest.fixture
def rng():
    return np.random.default_rng(0)
