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
from typing import Any

import numpy as np

from edge.runtime import EdgeModel
from tasks.config import PruneParams, QuantizeParams
from tasks.contracts import BatchNormCheck, Dataset, PruneTrial
from tasks.model import batchnorm, heads
from tasks.model.exporters import tflite_bytes
from tasks.model.keras_io import kernel_sparsity, tfmot

log = logging.getLogger(__name__)


# What tfmot (and Keras, rebuilding a model for it) raises when it refuses a layer or a model; any other
# error is a bug and propagates.
TFMOT_REFUSAL_MARKERS = (
    "is not supported. You can quantize this layer",  # RuntimeError: a layer without a QuantizeConfig
    "`to_quantize` can only", "`to_annotate` can only",  # ValueError: subclassed (non-functional) models
    "`prune_low_magnitude` can only prune",  # ValueError: subclassed models
    "Please initialize `Prune` with a supported layer",  # ValueError: a layer without prunable weights
    "Unable to clone model",  # ValueError: custom layers Keras cannot rebuild for tfmot
)


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
class FineTuning:
    """What every training step shares: the data, the loss that matches the head, the BatchNorm check after it."""

    train: Dataset
    val: Dataset
    batch_size: int
    output: heads.OutputKind = "probabilities"
    bn_max_gap_pts: float = 5.0
    batchnorm_checks: list[BatchNormCheck] = field(default_factory=list)

    def fit(self, model: Any, learning_rate: float, epochs: int, step: str, callbacks: list | None = None,
            settle: bool = True) -> None:
        """Train ``model`` with the head's loss; then (``settle``) check its BatchNorm statistics."""
        import tf_keras as keras

        model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=heads.loss(self.output),
                      metrics=["accuracy"])
        model.fit(self.train.x, self.train.y, validation_data=(self.val.x, self.val.y), epochs=epochs,
                  batch_size=self.batch_size, callbacks=callbacks or [], verbose=0, shuffle=True)
        if settle:
            self.settle(model, step)

    def settle(self, model: Any, step: str) -> None:
        """Re-estimate BatchNorm statistics when inference mode lags training mode (recorded either way)."""
        check = batchnorm.check_and_fix(model, step, self.train, self.val, self.bn_max_gap_pts)
        if check.layers:
            self.batchnorm_checks.append(check)


@dataclass
class QatOutcome:
    model: Any | None
    mode: str  # full | partial | fallback_ptq
    unsupported_layers: list[str] = field(default_factory=list)
    error: str = ""


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


def ptq_accuracy(model: Any, output: heads.OutputKind, representative: np.ndarray, data: Dataset) -> float:
    """Accuracy of full-integer PTQ of ``model`` as it will be exported (probabilities out), in LiteRT."""
    return runtime_accuracy(tflite_bytes(heads.with_probabilities(model, output), "int8", representative), data)


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


def prune_to(model: Any, target: float, params: PruneParams, tuning: FineTuning) -> Any:
    """Fine-tune a copy of ``model`` with a polynomial sparsity schedule; return it stripped and settled."""
    mot = tfmot()
    steps = int(np.ceil(len(tuning.train.y) / tuning.batch_size)) * params.epochs
    schedule = mot.sparsity.keras.PolynomialDecay(
        initial_sparsity=params.initial_sparsity, final_sparsity=target, begin_step=0,
        end_step=max(1, int(steps * 0.7)), frequency=max(1, steps // 50))
    with tfmot_refusals():
        wrapped = mot.sparsity.keras.prune_low_magnitude(copy_model(model), pruning_schedule=schedule)
    tuning.fit(wrapped, params.learning_rate, params.epochs, f"pruning {target:.0%}",
               [mot.sparsity.keras.UpdatePruningStep()], settle=False)
    stripped = mot.sparsity.keras.strip_pruning(wrapped)
    tuning.settle(stripped, f"pruning {target:.0%}")
    return stripped


def search_sparsity(model: Any, baseline_val: float, params: PruneParams,
                    tuning: FineTuning) -> tuple[Any, list[PruneTrial], bool]:
    """Step sparsity up; keep the highest whose val drop is within budget (else the lowest tried)."""
    kept, trials = None, []
    for target in sorted(params.target_sparsities):
        pruned = prune_to(model, target, params, tuning)
        accuracy = keras_accuracy(pruned, tuning.val)
        trial = PruneTrial(target_sparsity=target, measured_sparsity=kernel_sparsity(pruned), val_accuracy=accuracy,
                           drop_pts=100.0 * (baseline_val - accuracy))
        trials.append(trial)
        log.info("pruning to %.0f%%: val accuracy %.4f (drop %.2f pts)", 100 * target, accuracy, trial.drop_pts)
        if trial.drop_pts > params.max_accuracy_drop_pts:
            break
        kept = pruned
    if kept is not None:
        return kept, trials, True
    return prune_to(model, min(params.target_sparsities), params, tuning), trials, False


def prune_preserving_qat(pruned: Any, params: QuantizeParams, tuning: FineTuning) -> Any:
    """PQAT: QAT that keeps the pruned weights at zero."""
    mot = tfmot()
    with tfmot_refusals():
        annotated = mot.quantization.keras.quantize_annotate_model(pruned)
        scheme = mot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
        model = mot.quantization.keras.quantize_apply(annotated, scheme)
    tuning.fit(model, params.qat_learning_rate, params.qat_epochs, "pqat")
    return model
