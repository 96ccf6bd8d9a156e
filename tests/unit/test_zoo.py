"""Unit tests for the model zoo: every architecture builds, predicts and takes 8-bit QAT."""

from __future__ import annotations

import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")

from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_model_optimization as tfmot
import tf_keras as keras

from tasks.model.zoo import (
    HEAD_LAYER_NAME,
    ZOO_MODELS,
    ModelZooError,
    adapt_model,
    build_model,
    load_keras_model,
)

SHAPES = [(8, 8, 1), (32, 32, 3)]


def _layer_types(model: keras.Model) -> set[type]:
    return {type(layer) for layer in model.layers}


def _small_model(input_shape: tuple[int, int, int] = (8, 8, 1), num_classes: int = 3) -> keras.Model:
    inputs = keras.Input(shape=input_shape)
    x = keras.layers.Flatten()(inputs)
    x = keras.layers.Dense(16, activation="relu")(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax")(x)
    return keras.Model(inputs, outputs)


@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_build_model_predicts_probabilities(name: str, input_shape: tuple[int, int, int]) -> None:
    model = build_model(name, input_shape, 10)
    assert model.input_shape == (None, *input_shape)
    assert model.output_shape == (None, 10)
    assert model.optimizer is None  # uncompiled
    x = np.random.default_rng(0).random((4, *input_shape), dtype=np.float32)
    probs = model(x, training=False).numpy()
    assert probs.shape == (4, 10)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("input_shape", SHAPES)
@pytest.mark.parametrize("name", ZOO_MODELS)
def test_build_model_supports_default_qat(name: str, input_shape: tuple[int, int, int]) -> None:
    qat_model = tfmot.quantization.keras.quantize_model(build_model(name, input_shape, 5))
    assert qat_model.output_shape == (None, 5)


def test_digits_cnn_is_big_enough_for_8x8_digits() -> None:
    assert build_model("digits_cnn", (8, 8, 1), 10).count_params() >= 100_000


def test_architectures_have_their_signature_layers() -> None:
    assert keras.layers.Add in _layer_types(build_model("resnet8", (32, 32, 3), 10))
    for name in ("ds_cnn", "mobilenet_v1_025"):
        assert keras.layers.DepthwiseConv2D in _layer_types(build_model(name, (32, 32, 3), 10))


def test_bigger_images_are_downsampled() -> None:
    model = build_model("mobilenet_v1_025", (64, 64, 3), 2)
    assert model.get_layer(index=-2).output_shape == (None, 256)
    conv_shapes = [layer.output_shape for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert conv_shapes[-1][1:3] == (8, 8)  # 64 -> 32 -> 16 -> 8, then no further


@pytest.mark.parametrize("name", ["resnet8", "ds_cnn", "mobilenet_v1_025"])
def test_small_images_are_not_collapsed(name) -> None:
    """An 8x8 digit keeps its 8x8 feature map (the reference strides would end at 1x1)."""
    model = build_model(name, (8, 8, 1), 10)
    conv_shapes = [layer.output_shape for layer in model.layers if isinstance(layer, keras.layers.ReLU)]
    assert conv_shapes[-1][1:3] == (8, 8)


def test_unknown_model_name_lists_allowed_names() -> None:
    with pytest.raises(ModelZooError, match="resnet8"):
        build_model("vgg16", (8, 8, 1), 10)


@pytest.mark.parametrize(
    ("input_shape", "num_classes"),
    [((8, 8), 10), ((8, 8, 0), 10), ((2, 2, 1), 10), ((8, 8, 1), 1), ((8.0, 8, 1), 10)],
)
def test_bad_shape_or_class_count_raises(input_shape: tuple, num_classes: int) -> None:
    with pytest.raises(ModelZooError):
        build_model("digits_cnn", input_shape, num_classes)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_load_keras_model_round_trips(tmp_path: Path, suffix: str) -> None:
    model = _small_model()
    path = tmp_path / f"model{suffix}"
    model.save(path)
    loaded = load_keras_model(path)
    x = np.random.default_rng(1).random((2, 8, 8, 1), dtype=np.float32)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), rtol=1e-6)


@pytest.mark.parametrize("suffix", [".h5", ".keras"])
def test_load_corrupt_file_names_the_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"x{suffix}"
    path.write_bytes(np.random.default_rng(2).bytes(512))
    with pytest.raises(ModelZooError, match="not a valid Keras model") as info:
        load_keras_model(path)
    assert str(path) in str(info.value)
    assert info.value.__cause__ is not None


def test_load_missing_path_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelZooError, match="not found"):
        load_keras_model(tmp_path / "nope.keras")


def test_load_keras_savedmodel_directory(tmp_path: Path) -> None:
    model = _small_model()
    model.save(tmp_path / "saved")
    assert load_keras_model(tmp_path / "saved").output_shape == (None, 3)


def test_load_savedmodel_without_keras_metadata_raises(tmp_path: Path) -> None:
    module = tf.Module()
    module.scale = tf.Variable(2.0)
    tf.saved_model.save(module, str(tmp_path / "raw"))
    with pytest.raises(ModelZooError, match="not a valid Keras model"):
        load_keras_model(tmp_path / "raw")


def test_load_directory_that_is_not_a_savedmodel_raises(tmp_path: Path) -> None:
    with pytest.raises(ModelZooError, match="not a SavedModel"):
        load_keras_model(tmp_path)


def test_load_unsupported_suffix_raises(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"x")
    with pytest.raises(ModelZooError, match="suffix"):
        load_keras_model(path)


def test_adapt_model_replaces_head_when_classes_differ() -> None:
    model = _small_model(num_classes=3)
    adapted = adapt_model(model, (8, 8, 1), 7)
    assert adapted.output_shape == (None, 7)
    assert adapted.layers[-1].name == HEAD_LAYER_NAME
    assert adapted.layers[-2] is model.layers[-2]  # the backbone is kept, weights and all
    probs = adapted(np.zeros((1, 8, 8, 1), dtype=np.float32)).numpy()
    np.testing.assert_allclose(probs.sum(), 1.0, rtol=1e-5)


def test_adapt_model_keeps_model_when_classes_match() -> None:
    model = build_model("resnet8", (8, 8, 1), 4)
    assert adapt_model(model, (8, 8, 1), 4) is model


def test_adapt_model_rejects_input_shape_mismatch() -> None:
    with pytest.raises(ModelZooError, match=r"\(8, 8, 1\).*\(32, 32, 3\)"):
        adapt_model(_small_model(), (32, 32, 3), 3)
