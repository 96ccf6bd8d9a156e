"""BatchNorm statistics that match the weights.

With Keras' default momentum (0.99) and a small dataset (tens of steps an epoch) a model can score
99% in training mode (batch statistics) and chance in inference mode (moving statistics that have
not caught up). After each fine-tuning step the recipe compares the two modes on the validation set;
when inference mode lags, the moving mean and variance are re-estimated from the training set: each
BatchNorm layer, in graph order, gets the exact mean and variance of its inputs with every earlier
layer in inference mode (no weight updates, no dropout), a standard step in quantization toolkits.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from tasks.contracts import BatchNormCheck, Dataset

log = logging.getLogger(__name__)


def batchnorm_layers(model: Any) -> list[Any]:
    """The model's layers that hold BatchNorm statistics (plain, or inside a tfmot QAT/pruning wrapper)."""
    import tf_keras as keras

    return [layer for layer in model.layers
            if isinstance(getattr(layer, "layer", layer), keras.layers.BatchNormalization)]


def nested_batchnorm(model: Any) -> int:
    """BatchNorm layers inside nested sub-models: measured with the whole model, not re-estimated one by one."""
    import tf_keras as keras

    return sum(1 for layer in model.layers if isinstance(layer, keras.Model) for inner in layer.submodules
               if isinstance(inner, keras.layers.BatchNormalization))


def mode_accuracies(model: Any, data: Dataset, batch_size: int = 256) -> tuple[float, float]:
    """(inference-mode accuracy, training-mode accuracy) on ``data``, batch by batch; no weights change.

    A training-mode call moves state in Keras (BatchNorm moving statistics, tfmot's quantizer ranges),
    so every non-trainable weight is put back afterwards.
    """
    state = [(weight, weight.numpy()) for weight in model.non_trainable_weights]
    inference, training = [], []
    try:
        for start in range(0, len(data.y), batch_size):
            batch, labels = data.x[start:start + batch_size], data.y[start:start + batch_size]
            inference.append(np.argmax(model(batch, training=False).numpy(), axis=1) == labels)
            training.append(np.argmax(model(batch, training=True).numpy(), axis=1) == labels)
    finally:
        for weight, value in state:
            weight.assign(value)
    return float(np.mean(np.concatenate(inference))), float(np.mean(np.concatenate(training)))


def inference_accuracy(model: Any, data: Dataset, batch_size: int = 256) -> float:
    """Accuracy on ``data`` in inference mode (moving statistics)."""
    predictions = [np.argmax(model(data.x[start:start + batch_size], training=False).numpy(), axis=1)
                   for start in range(0, len(data.y), batch_size)]
    return float(np.mean(np.concatenate(predictions) == data.y))


def reestimate(model: Any, samples: np.ndarray, batch_size: int = 256) -> int:
    """Set every BatchNorm layer's moving statistics to those of its inputs on ``samples``; return how many."""
    import tf_keras as keras

    updated = 0
    for layer in batchnorm_layers(model):
        norm = getattr(layer, "layer", layer)
        probe = keras.Model(model.inputs, layer.input)  # earlier BatchNorms are already re-estimated
        axes = tuple(axis for axis in range(len(layer.input.shape)) if axis not in _feature_axes(norm, layer))
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(samples), batch_size):
            inputs = probe(samples[start:start + batch_size], training=False).numpy().astype(np.float64)
            total = total + inputs.sum(axis=axes)
            total_sq = total_sq + np.square(inputs).sum(axis=axes)
            count += int(np.prod([inputs.shape[axis] for axis in axes]))
        mean = total / count
        variance = np.maximum(total_sq / count - np.square(mean), 0.0)
        norm.moving_mean.assign(mean.astype(np.float32))
        norm.moving_variance.assign(variance.astype(np.float32))
        updated += 1
    return updated


def _feature_axes(norm: Any, layer: Any) -> tuple[int, ...]:
    rank = len(layer.input.shape)
    axes = norm.axis if isinstance(norm.axis, list | tuple) else [norm.axis]
    return tuple(axis % rank for axis in axes)


def check_and_fix(model: Any, step: str, train: Dataset, val: Dataset, max_gap_pts: float) -> BatchNormCheck:
    """Compare inference and training mode on ``val``; re-estimate the statistics when inference lags."""
    nested = nested_batchnorm(model)
    layers = len(batchnorm_layers(model)) + nested
    if not layers:
        return BatchNormCheck(step=step, layers=0, inference_accuracy=None, training_mode_accuracy=None)
    inference, training = mode_accuracies(model, val)
    check = BatchNormCheck(step=step, layers=layers, inference_accuracy=inference, training_mode_accuracy=training)
    if 100.0 * (training - inference) <= max_gap_pts:
        return check
    if nested:
        log.warning("%s: inference mode lags training mode (%.3f vs %.3f) but the BatchNorm layers sit in a "
                    "nested sub-model edgeloop cannot probe; flatten the model to have them re-estimated",
                    step, inference, training)
        return check
    try:
        reestimate(model, train.x)
    except (AttributeError, ValueError) as error:  # shared layers: a BatchNorm input with several sources
        log.warning("%s: BatchNorm statistics could not be re-estimated (%s)", step, error)
        return check
    after = inference_accuracy(model, val)
    log.warning("%s: inference-mode accuracy %.3f lagged training mode %.3f; BatchNorm statistics re-estimated "
                "on %d training samples: %.3f", step, inference, training, len(train.y), after)
    return check.model_copy(update={"reestimated": True, "inference_accuracy_after": after})
