"""Import TensorFlow the one way this project supports: Keras 2 (tf_keras), deterministic, quiet.

tensorflow-model-optimization rejects Keras 3 models, so TF_USE_LEGACY_KERAS=1 must be set before
TensorFlow is first imported. Every module that needs TensorFlow calls :func:`tensorflow` instead of
importing it directly.
"""

from __future__ import annotations

import os
from types import ModuleType


def tensorflow() -> ModuleType:
    """Return the ``tensorflow`` module, imported with the legacy-Keras setting in place."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def set_seeds(seed: int) -> None:
    """Seed Python, numpy and TensorFlow and make TF ops deterministic (same params, same model)."""
    tf = tensorflow()
    import tf_keras

    tf_keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()
