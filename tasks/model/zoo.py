"""The model zoo: small Keras 2 classifiers for edge targets, plus "bring your own model".

Every architecture is built for whatever input shape ``(H, W, C)`` and class count the data has,
ends in ``Dense(num_classes, activation="softmax")`` and uses only layers that the default 8-bit
quantization-aware training of tensorflow-model-optimization supports (conv followed directly by
batch norm and ReLU, so the batch norm folds into the conv when quantized).

The models are Keras 2 (``tf_keras``) models because tensorflow-model-optimization needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from numbers import Integral
from pathlib import Path
from typing import Any

from tasks.errors import ModelZooError
from tasks.model.tfsetup import tensorflow

tensorflow()  # Keras 2 (tf_keras) for tfmot, set before TensorFlow is first imported; quiet logs
import tf_keras as keras  # noqa: E402

ZOO_MODELS: tuple[str, ...] = ("digits_cnn", "resnet8", "ds_cnn", "mobilenet_v1_025")
KERAS_SUFFIXES: tuple[str, ...] = (".keras", ".h5", ".hdf5")
HEAD_LAYER_NAME = "edgeloop_head"

# Keras' default (0.99) leaves the moving statistics far behind the weights on small datasets (tens of
# steps an epoch): inference mode then scores near chance while training mode scores 99%.
BN_MOMENTUM = 0.9
MIN_DOWNSAMPLED_SIZE = 8  # never stride below this many pixels per side

layers = keras.layers
Tensor = Any  # a symbolic Keras tensor; tf_keras exports no public KerasTensor type


def _strides(x: Tensor) -> tuple[int, int]:
    """Stride 2 along each spatial axis that keeps >= 8 pixels after it, else 1.

    Small inputs keep a usable feature map: an 8x8 digit stays 8x8, where the reference strides
    collapse it to 1x1 (MobileNet) and lose what the classifier needs; 32x32 (ResNet-8) and 96x96
    (MobileNet, visual wake words) inputs are downsampled as in the references down to 8x8 or 12x12.
    """
    return tuple(2 if dim is not None and dim >= 2 * MIN_DOWNSAMPLED_SIZE else 1  # type: ignore[return-value]
                 for dim in x.shape[1:3])


def _conv_bn_relu(
    x: Tensor,
    filters: int,
    kernel: int | tuple[int, int],
    strides: int | tuple[int, int] = 1,
    relu: bool = True,
    max_value: float | None = None,
) -> Tensor:
    """Conv2D (no bias) -> BatchNorm [-> ReLU]: the pattern tfmot folds for quantization."""
    x = layers.Conv2D(filters, kernel, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    return layers.ReLU(max_value=max_value)(x) if relu else x


def _depthwise_bn_relu(x: Tensor, strides: int | tuple[int, int] = 1, max_value: float | None = None) -> Tensor:
    """DepthwiseConv2D 3x3 (no bias) -> BatchNorm -> ReLU."""
    x = layers.DepthwiseConv2D(3, strides=strides, padding="same", use_bias=False)(x)
    x = layers.BatchNormalization(momentum=BN_MOMENTUM)(x)
    return layers.ReLU(max_value=max_value)(x)


def _digits_cnn(inputs: Tensor) -> Tensor:
    """Two convs, a max pool and a wide dense layer: the digits baseline (~150k params at 8x8x1)."""
    x = layers.Conv2D(32, 3, padding="same", activation="relu")(inputs)
    x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
    x = layers.MaxPool2D(2)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(128, activation="relu")(x)
    return layers.Dropout(0.25)(x)


def _residual_block(x: Tensor, filters: int, downsample: bool) -> Tensor:
    """Two 3x3 conv+BN with an ``Add`` shortcut (1x1 projection when stride or filters change)."""
    strides = _strides(x) if downsample else (1, 1)
    y = _conv_bn_relu(x, filters, 3, strides)
    y = _conv_bn_relu(y, filters, 3, relu=False)
    if strides != (1, 1) or x.shape[-1] != filters:
        x = layers.Conv2D(filters, 1, strides=strides, padding="same")(x)
    x = layers.Add()([x, y])
    return layers.ReLU()(x)


def _resnet8(inputs: Tensor) -> Tensor:
    """MLPerf Tiny image-classification ResNet-8 backbone."""
    x = _conv_bn_relu(inputs, 16, 3)
    for filters, downsample in ((16, False), (32, True), (64, True)):
        x = _residual_block(x, filters, downsample)
    return layers.GlobalAveragePooling2D()(x)


def _ds_cnn(inputs: Tensor) -> Tensor:
    """MLPerf Tiny keyword-spotting DS-CNN (small) backbone; the 10x4 kernel is clamped to the input."""
    height, width = inputs.shape[1], inputs.shape[2]
    x = _conv_bn_relu(inputs, 64, (min(10, height), min(4, width)), _strides(inputs))
    x = layers.Dropout(0.2)(x)
    for _ in range(4):
        x = _depthwise_bn_relu(x)
        x = _conv_bn_relu(x, 64, 1)
    x = layers.Dropout(0.4)(x)
    return layers.GlobalAveragePooling2D()(x)


_MOBILENET_BLOCKS: tuple[tuple[int, bool], ...] = (
    (64, False), (128, True), (128, False), (256, True), (256, False), (512, True),
    (512, False), (512, False), (512, False), (512, False), (512, False), (1024, True), (1024, False),
)  # fmt: skip


def _mobilenet_v1_025(inputs: Tensor, alpha: float = 0.25) -> Tensor:
    """MobileNetV1 (alpha 0.25, the visual wake words reference): a conv and 13 separable blocks."""
    x = _conv_bn_relu(inputs, int(32 * alpha), 3, _strides(inputs), max_value=6.0)
    for filters, downsample in _MOBILENET_BLOCKS:
        x = _depthwise_bn_relu(x, _strides(x) if downsample else 1, max_value=6.0)
        x = _conv_bn_relu(x, int(filters * alpha), 1, max_value=6.0)
    return layers.GlobalAveragePooling2D()(x)


_BACKBONES: dict[str, Callable[[Tensor], Tensor]] = {
    "digits_cnn": _digits_cnn,
    "resnet8": _resnet8,
    "ds_cnn": _ds_cnn,
    "mobilenet_v1_025": _mobilenet_v1_025,
}


def _check_target(input_shape: tuple[int, int, int], num_classes: int) -> tuple[int, int, int]:
    """Validate the data's input shape and class count; return the shape as a tuple of ints."""
    dims = tuple(input_shape)
    if len(dims) != 3 or not all(isinstance(d, Integral) and not isinstance(d, bool) and d > 0 for d in dims):
        raise ModelZooError(f"input_shape {input_shape!r} must be three positive integers (height, width, channels)")
    shape = tuple(int(d) for d in dims)
    if min(shape[:2]) < 4:
        raise ModelZooError(f"input_shape {shape} is too small: the zoo models need images of at least 4x4 pixels")
    if isinstance(num_classes, bool) or not isinstance(num_classes, Integral) or num_classes < 2:
        raise ModelZooError(f"num_classes is {num_classes!r}; a classifier needs at least 2 classes")
    return shape  # type: ignore[return-value]


def build_model(name: str, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Build the uncompiled zoo model ``name`` for ``input_shape`` (H, W, C) and ``num_classes``."""
    if name not in _BACKBONES:
        raise ModelZooError(f"unknown zoo model {name!r}; choose one of: {', '.join(ZOO_MODELS)}")
    shape = _check_target(input_shape, num_classes)
    inputs = keras.Input(shape=shape, name="image")
    features = _BACKBONES[name](inputs)
    outputs = layers.Dense(num_classes, activation="softmax", name="classifier")(features)
    return keras.Model(inputs, outputs, name=name)


def _check_saved_model_dir(path: Path) -> None:
    """Raise unless ``path`` is a SavedModel directory written by Keras."""
    if not (path / "saved_model.pb").is_file():
        raise ModelZooError(
            f"{path} is a directory but not a SavedModel (no saved_model.pb); "
            f"point train.model_path at a .keras or .h5 file or a Keras SavedModel directory"
        )
    if not (path / "keras_metadata.pb").is_file():
        raise ModelZooError(
            f"{path} is a SavedModel without Keras metadata, so it is not a valid Keras model; "
            f"re-export it from Keras with model.save(...) as a .keras or .h5 file"
        )


def load_keras_model(path: Path) -> keras.Model:
    """Load a user's model (``.keras``, ``.h5`` or a Keras SavedModel directory) without compiling it."""
    path = Path(path)
    if not path.exists():
        raise ModelZooError(f"model path {path} not found; check train.model_path")
    if path.is_dir():
        _check_saved_model_dir(path)
    elif path.suffix.lower() not in KERAS_SUFFIXES:
        raise ModelZooError(
            f"{path} has an unsupported suffix; save the model as one of {', '.join(KERAS_SUFFIXES)} "
            f"or as a SavedModel directory"
        )
    try:
        model = keras.models.load_model(path, compile=False)
    except Exception as exc:  # h5py, zipfile, protobuf and Keras all raise their own types
        raise ModelZooError(
            f"{path} is not a valid Keras model ({type(exc).__name__}: {exc}); "
            f"re-save it with tf_keras model.save(...) (custom layers are not supported)"
        ) from exc
    if not isinstance(model, keras.Model):
        raise ModelZooError(f"{path} is not a valid Keras model (loaded a {type(model).__name__})")
    return model


def _single_shape(shape: object, what: str) -> tuple:
    """The shape of a model's only input or output; raise if it has several."""
    if isinstance(shape, list):
        raise ModelZooError(f"the model has {len(shape)} {what}s; edgeloop needs exactly one")
    return tuple(shape)  # type: ignore[arg-type]


def adapt_model(model: keras.Model, input_shape: tuple[int, int, int], num_classes: int) -> keras.Model:
    """Check ``model`` fits the data; swap its head for ``Dense(num_classes)`` if the class count differs."""
    shape = _check_target(input_shape, num_classes)
    model_shape = _single_shape(model.input_shape, "input")[1:]
    fits = len(model_shape) == 3 and all(m is None or m == d for m, d in zip(model_shape, shape))
    if not fits:
        raise ModelZooError(
            f"the model expects inputs of shape {model_shape} but the data has shape {shape}; "
            f"set data.image_size / data.color_mode to match, or use a model built for this shape"
        )
    out_shape = _single_shape(model.output_shape, "output")
    if len(out_shape) != 2:
        raise ModelZooError(f"the model output has shape {out_shape}; edgeloop needs (batch, classes) outputs")
    if out_shape[1] == num_classes:
        return model
    features = model.layers[-1].input
    if isinstance(features, (list, tuple)) or len(features.shape) != 2:
        raise ModelZooError(
            f"cannot replace the head of {model.name!r}: its last layer must take one flat "
            f"(batch, features) input; end the model with a Dense layer"
        )
    outputs = layers.Dense(num_classes, activation="softmax", name=HEAD_LAYER_NAME)(features)
    return keras.Model(model.inputs, outputs, name=model.name)
