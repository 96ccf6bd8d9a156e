"""The guide's optimisation recipe on a trained float32 Keras model.

Post-training quantization is measured first; quantization-aware training (QAT) follows when its
accuracy drop is too large (or when asked). Magnitude pruning steps sparsity up from 10% and keeps
the highest sparsity within the accuracy budget; pruning-preserving QAT (PQAT) gives the pruned +
int8 variant. Layers tfmot cannot quantize are reported by name and left in float (or the recipe
falls back to PTQ) instead of crashing the pipeline.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.runtime import EdgeModel
from tasks.config import PruneParams, QuantizeParams, TrainParams
from tasks.contracts import Dataset, PruneTrial
from tasks.model.exporters import tflite_bytes
from tasks.model.tfsetup import tensorflow

log = logging.getLogger(__name__)


# What tfmot raises when it refuses a layer or a model (anything else is a bug and propagates):
# RuntimeError "Layer x:<class> is not supported. You can quantize this layer by passing ...",
# ValueError "`to_quantize` can only either be a keras Sequential or Functional model",
# ValueError "`prune_low_magnitude` can only prune an object of the following types: ...",
# ValueError "Please initialize `Prune` with a supported layer. ...".
TFMOT_REFUSAL_MARKERS = ("is not supported", "can only", "supported layer")


class TfmotRefused(Exception):
    """tfmot declined a layer or model: the recipe falls back, naming what it could not handle."""


@contextmanager
def tfmot_refusals() -> Iterator[None]:
    """Turn tfmot's refusals (and only those) into :class:`TfmotRefused`; other errors propagate."""
    try:
        yield
    except (RuntimeError, ValueError) as error:
        if not any(marker in str(error) for marker in TFMOT_REFUSAL_MARKERS):
            raise
        raise TfmotRefused(f"{type(error).__name__}: {error}"[:500]) from error


@dataclass
class QatOutcome:
    model: Any | None
    mode: str  # full | partial | fallback_ptq
    unsupported_layers: list[str] = field(default_factory=list)
    error: str = ""


def tfmot():
    tensorflow()
    import tensorflow_model_optimization

    return tensorflow_model_optimization


def keras_accuracy(model: Any, data: Dataset) -> float:
    probabilities = model.predict(data.x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(probabilities, axis=1) == data.y))


def runtime_accuracy(model_bytes: bytes, data: Dataset) -> float:
    """Accuracy of a converted .tflite measured in LiteRT, the runtime the device uses."""
    with tempfile.NamedTemporaryFile(suffix=".tflite") as handle:
        handle.write(model_bytes)
        handle.flush()
        outputs = EdgeModel.load(handle.name).predict(data.x)
    return float(np.mean(np.argmax(outputs, axis=1) == data.y))


def ptq_accuracy(model: Any, representative: np.ndarray, data: Dataset) -> float:
    """Accuracy of full-integer PTQ of ``model``, in LiteRT."""
    return runtime_accuracy(tflite_bytes(model, "int8", representative), data)


def compile_model(model: Any, learning_rate: float) -> None:
    import tf_keras as keras

    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])


def fit(model: Any, train: Dataset, val: Dataset, epochs: int, batch_size: int, callbacks=None) -> None:
    model.fit(train.x, train.y, validation_data=(val.x, val.y), epochs=epochs, batch_size=batch_size,
              callbacks=callbacks or [], verbose=0, shuffle=True)


def unsupported_layers(model: Any, purpose: str = "quantize") -> list[str]:
    """Names of layers tfmot cannot ``quantize`` (default 8-bit scheme) or ``prune``."""
    import tf_keras as keras

    if purpose == "prune":
        from tensorflow_model_optimization.python.core.sparsity.keras.prune_registry import PruneRegistry

        supports = PruneRegistry.supports
    else:
        from tensorflow_model_optimization.python.core.quantization.keras.default_8bit import (
            default_8bit_quantize_registry as registry,
        )

        supports = registry.Default8BitQuantizeRegistry().supports
    return [layer.name for layer in model.layers
            if not isinstance(layer, keras.layers.InputLayer) and not supports(layer)]


def quantize_aware(model: Any) -> QatOutcome:
    """Wrap ``model`` for QAT: whole model, else only the supported layers, else report a PTQ fallback."""
    import tf_keras as keras

    mot = tfmot()
    try:
        with tfmot_refusals():
            return QatOutcome(mot.quantization.keras.quantize_model(model), "full")
    except TfmotRefused as error:
        unsupported = unsupported_layers(model)
        log.warning("QAT of the whole model failed (%s); unsupported layers: %s", error, unsupported)
    try:
        skip = set(unsupported)
        # tfmot rebuilds the model from its config: it must know the user's custom layer classes
        custom_objects = {type(layer).__name__: type(layer) for layer in model.layers}
        with tfmot_refusals(), mot.quantization.keras.quantize_scope(custom_objects):
            annotated = keras.models.clone_model(
                model,
                clone_function=lambda layer: layer.__class__.from_config(layer.get_config())
                if layer.name in skip else mot.quantization.keras.quantize_annotate_layer(
                    layer.__class__.from_config(layer.get_config())),
            )
            annotated.set_weights(model.get_weights())
            return QatOutcome(mot.quantization.keras.quantize_apply(annotated), "partial", unsupported)
    except TfmotRefused as error:
        log.warning("partial QAT failed too (%s); falling back to post-training quantization", error)
        return QatOutcome(None, "fallback_ptq", unsupported, str(error))


def copy_model(model: Any) -> Any:
    import tf_keras as keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def prune_to(model: Any, target: float, params: PruneParams, train: Dataset, val: Dataset,
             batch_size: int) -> Any:
    """Fine-tune a copy of ``model`` with a polynomial sparsity schedule; return it stripped."""
    mot = tfmot()
    steps = int(np.ceil(len(train.y) / batch_size)) * params.epochs
    schedule = mot.sparsity.keras.PolynomialDecay(
        initial_sparsity=params.initial_sparsity, final_sparsity=target, begin_step=0,
        end_step=max(1, int(steps * 0.7)), frequency=max(1, steps // 50))
    with tfmot_refusals():
        wrapped = mot.sparsity.keras.prune_low_magnitude(copy_model(model), pruning_schedule=schedule)
    compile_model(wrapped, params.learning_rate)
    fit(wrapped, train, val, params.epochs, batch_size, [mot.sparsity.keras.UpdatePruningStep()])
    return mot.sparsity.keras.strip_pruning(wrapped)


def kernel_sparsity(model: Any) -> float:
    """Fraction of exact zeros among the kernel weights (tensors of rank >= 2)."""
    kernels = [w for w in model.get_weights() if w.ndim >= 2]
    total = sum(w.size for w in kernels)
    return float(sum(np.count_nonzero(w == 0) for w in kernels) / total) if total else 0.0


def search_sparsity(model: Any, baseline_val: float, params: PruneParams, train: Dataset, val: Dataset,
                    batch_size: int) -> tuple[Any, list[PruneTrial], bool]:
    """Step sparsity up; keep the highest whose val drop is within budget (else the lowest tried)."""
    kept, trials = None, []
    for target in sorted(params.target_sparsities):
        pruned = prune_to(model, target, params, train, val, batch_size)
        accuracy = keras_accuracy(pruned, val)
        trial = PruneTrial(target_sparsity=target, measured_sparsity=kernel_sparsity(pruned), val_accuracy=accuracy,
                           drop_pts=100.0 * (baseline_val - accuracy))
        trials.append(trial)
        log.info("pruning to %.0f%%: val accuracy %.4f (drop %.2f pts)", 100 * target, accuracy, trial.drop_pts)
        if trial.drop_pts > params.max_accuracy_drop_pts:
            break
        kept = pruned
    if kept is not None:
        return kept, trials, True
    return prune_to(model, min(params.target_sparsities), params, train, val, batch_size), trials, False


def prune_preserving_qat(pruned: Any, params: QuantizeParams, train: TrainParams, data_train: Dataset,
                         val: Dataset) -> Any:
    """PQAT: QAT that keeps the pruned weights at zero."""
    mot = tfmot()
    with tfmot_refusals():
        annotated = mot.quantization.keras.quantize_annotate_model(pruned)
        scheme = mot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
        model = mot.quantization.keras.quantize_apply(annotated, scheme)
    compile_model(model, params.qat_learning_rate)
    fit(model, data_train, val, params.qat_epochs, train.batch_size)
    return model


def load_trained(path: Path) -> Any:
    """Load a model this stage saved (QAT and PQAT models need tfmot's quantize scope)."""
    import tf_keras as keras

    with tfmot().quantization.keras.quantize_scope():
        return keras.models.load_model(path, compile=False)
