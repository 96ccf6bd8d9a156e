"""Loading the Keras models the train stage saved, and facts about their weights (no training here).

The convert stage needs only this, so editing the optimisation recipe does not re-run conversion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.model.tfsetup import tensorflow


def tfmot():
    tensorflow()
    import tensorflow_model_optimization

    return tensorflow_model_optimization


def kernel_sparsity(model: Any) -> float:
    """Fraction of exact zeros among the kernel weights (tensors of rank >= 2)."""
    kernels = [w for w in model.get_weights() if w.ndim >= 2]
    total = sum(w.size for w in kernels)
    return float(sum(np.count_nonzero(w == 0) for w in kernels) / total) if total else 0.0


def load_trained(path: Path) -> Any:
    """Load a model the train stage saved (QAT and PQAT models need tfmot's quantize scope)."""
    import tf_keras as keras

    with tfmot().quantization.keras.quantize_scope():
        return keras.models.load_model(path, compile=False)
