"""Which Python module each runtime is imported from, found without importing it (nor numpy: the on-device
benchmark times the runtime's import itself).

LiteRT's interpreter comes from ``ai-edge-litert`` where that has wheels (amd64, arm64) and from
``tflite-runtime`` (the same interpreter API, TensorFlow 2.14's) where it has none: 32-bit ARM (armv7).
"""

from __future__ import annotations

from importlib.util import find_spec

RUNTIME_BY_SUFFIX = {".tflite": "tflite", ".onnx": "onnx"}
# in order of preference; a runtime is installed when one of its modules is
RUNTIME_MODULES = {"tflite": ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"), "onnx": ("onnxruntime",)}


def runtime_module(runtime: str) -> str | None:
    """The module ``runtime`` (``tflite``, ``onnx``) is imported from here, or None when none is installed."""
    for module in RUNTIME_MODULES.get(runtime, ()):
        if find_spec(module.split(".")[0]) is not None:  # the top package: finding a submodule imports its parent
            return module
    return None


def module_for(path_suffix: str) -> str | None:
    """The installed runtime module that runs a model file with ``path_suffix`` (``.tflite``, ``.onnx``)."""
    runtime = RUNTIME_BY_SUFFIX.get(path_suffix)
    return runtime_module(runtime) if runtime else None


def installed_runtimes() -> tuple[str, ...]:
    """The runtimes this Python can serve (their packages are installed), without importing them."""
    return tuple(runtime for runtime in RUNTIME_MODULES if runtime_module(runtime) is not None)
