"""The MLflow pyfunc face of a registered variant (an MLflow "model from code" file).

``mlflow.pyfunc.log_model(python_model=<this file>, code_paths=[edge/], artifacts={"variant": dir})``
stores it with the model file, its sidecar and the ``edge`` package, so that
``mlflow.pyfunc.load_model("models:/<name>@champion").predict(batch)`` and ``mlflow models serve``
run the very code a device runs (LiteRT / ONNX Runtime, never TensorFlow). This file is executed by
MLflow when a model is loaded; nothing in the pipeline imports it.
"""

from __future__ import annotations

import threading
from pathlib import Path

import mlflow
import numpy as np


class EdgeVariantModel(mlflow.pyfunc.PythonModel):
    """Float batch (N, H, W, C) in, class probabilities (N, classes) out, through ``edge.runtime``."""

    def load_context(self, context) -> None:
        from edge.runtime import RUNTIME_BY_SUFFIX, EdgeModel

        folder = Path(context.artifacts["variant"])
        model_files = [path for path in folder.iterdir() if path.suffix in RUNTIME_BY_SUFFIX]
        if len(model_files) != 1:
            raise RuntimeError(f"{folder} holds {len(model_files)} model files; expected exactly one")
        self.model = EdgeModel.load(model_files[0], num_threads=1)  # verifies the sidecar's sha256
        self.lock = threading.Lock()  # one interpreter; `mlflow models serve` calls predict from many threads

    def predict(self, context, model_input, params=None):
        if isinstance(model_input, dict) and len(model_input) == 1:  # {"images": batch}
            model_input = next(iter(model_input.values()))
        batch = model_input.to_numpy() if hasattr(model_input, "to_numpy") else np.asarray(model_input)
        with self.lock:
            return self.model.predict(batch.astype(np.float32, copy=False))


mlflow.models.set_model(EdgeVariantModel())
