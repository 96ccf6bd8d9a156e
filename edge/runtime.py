"""Load a model file and run it in the runtime a device uses: LiteRT for .tflite, ONNX Runtime for .onnx.

Quantized inputs and outputs are handled here (scale and zero-point), so host evaluation, the
device server and the on-device benchmark all run exactly the same code. Callers pass float32
inputs and get float32 class probabilities back, whatever the model's tensor types are.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Protocol

import numpy as np

from edge.errors import InferenceError, ModelLoadError
from edge.sidecar import sidecar_path, verify_model_file

RUNTIME_BY_SUFFIX = {".tflite": "tflite", ".onnx": "onnx"}
# the module each runtime is imported from, in order of preference: LiteRT's interpreter comes from ai-edge-litert
# where that has wheels (amd64, arm64) and from tflite-runtime (the same API, TensorFlow 2.14's) on 32-bit ARM
RUNTIME_MODULES = {"tflite": ("ai_edge_litert.interpreter", "tflite_runtime.interpreter"), "onnx": ("onnxruntime",)}


def runtime_module(runtime: str) -> str | None:
    """The module ``runtime`` (``tflite``, ``onnx``) is imported from here, found without importing it; None when
    none is installed."""
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


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape (batch dim as -1), dtype and affine quantization (scale, zero_point) of a tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: float = 0.0
    zero_point: int = 0

    @property
    def quantized(self) -> bool:
        return self.dtype in ("int8", "uint8") and self.scale > 0.0


@dataclass(frozen=True)
class RuntimeOptions:
    """Delegates and providers: XNNPACK on or off for LiteRT; ONNX Runtime execution providers in order of
    preference (the CPU provider is always the last resort)."""

    xnnpack: bool = True
    onnx_providers: tuple[str, ...] = ("CPUExecutionProvider",)


class _Backend(Protocol):
    input: TensorInfo
    output: TensorInfo
    accelerators: list[str]  # delegates / providers actually in use besides the plain CPU kernels

    def run(self, batch: np.ndarray) -> np.ndarray: ...


def quantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Float values to the tensor's integer type: round(x / scale) + zero_point, clipped."""
    limits = np.iinfo(info.dtype)
    scaled = np.round(values / info.scale) + info.zero_point
    return np.clip(scaled, limits.min, limits.max).astype(info.dtype)


def dequantize(values: np.ndarray, info: TensorInfo) -> np.ndarray:
    """Integer tensor values back to float32: (q - zero_point) * scale."""
    return ((values.astype(np.float32) - info.zero_point) * info.scale).astype(np.float32)


class _LiteRTBackend:
    def __init__(self, path: Path, num_threads: int | None, options: RuntimeOptions) -> None:
        from importlib import import_module

        litert = import_module(runtime_module("tflite") or "ai_edge_litert.interpreter")  # armv7: tflite_runtime
        Interpreter, OpResolverType = litert.Interpreter, litert.OpResolverType  # noqa: N806 (classes)
        resolver = OpResolverType.AUTO if options.xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self._interpreter = Interpreter(model_path=str(path), num_threads=num_threads,
                                        experimental_op_resolver_type=resolver)
        self.accelerators = ["XNNPACK"] if options.xnnpack else []
        self._interpreter.allocate_tensors()
        self._input_detail = self._interpreter.get_input_details()[0]
        self._output_detail = self._interpreter.get_output_details()[0]
        self.input = self._info(self._input_detail)
        self.output = self._info(self._output_detail)
        self._batch = int(self._input_detail["shape"][0])

    @staticmethod
    def _info(detail: dict) -> TensorInfo:
        scale, zero_point = detail["quantization"]
        shape = tuple(int(d) for d in detail["shape_signature"])
        return TensorInfo(detail["name"], shape, np.dtype(detail["dtype"]).name, float(scale), int(zero_point))

    def run(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape[0] != self._batch:
            self._interpreter.resize_tensor_input(self._input_detail["index"], list(batch.shape))
            self._interpreter.allocate_tensors()
            self._batch = batch.shape[0]
        self._interpreter.set_tensor(self._input_detail["index"], batch)
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output_detail["index"])


class _OnnxBackend:
    _ONNX_TYPES = {"tensor(float)": "float32", "tensor(int8)": "int8", "tensor(uint8)": "uint8"}

    def __init__(self, path: Path, num_threads: int | None, options: RuntimeOptions) -> None:
        import onnxruntime as ort

        session_options = ort.SessionOptions()
        if num_threads:
            session_options.intra_op_num_threads = num_threads
        session_options.log_severity_level = 3
        available = set(ort.get_available_providers())
        # a provider this build lacks is left out (and reported by the caller as a fallback), never an error
        providers = [p for p in options.onnx_providers if p in available] or ["CPUExecutionProvider"]
        if "CPUExecutionProvider" not in providers:
            providers.append("CPUExecutionProvider")
        self._session = ort.InferenceSession(str(path), session_options, providers=providers)
        self.accelerators = [p for p in self._session.get_providers() if p != "CPUExecutionProvider"]
        self.input = self._info(self._session.get_inputs()[0])
        self.output = self._info(self._session.get_outputs()[0])

    @classmethod
    def _info(cls, node) -> TensorInfo:
        shape = tuple(d if isinstance(d, int) else -1 for d in node.shape)
        return TensorInfo(node.name, shape, cls._ONNX_TYPES.get(node.type, node.type))

    def run(self, batch: np.ndarray) -> np.ndarray:
        return self._session.run([self.output.name], {self.input.name: batch})[0]


class EdgeModel:
    """A loaded model file plus the pre/post-processing its tensor types need."""

    def __init__(self, path: Path, runtime: str, backend: _Backend) -> None:
        self.path = path
        self.runtime = runtime
        self._backend = backend

    @classmethod
    def load(cls, path: Path | str, num_threads: int | None = None, verify: bool = True,
             options: RuntimeOptions = RuntimeOptions()) -> EdgeModel:
        """Open ``path`` in the runtime its suffix names; raise :class:`ModelLoadError` when it can't.

        With ``verify`` (the default) a file that has a sidecar must match its sha256, else
        :class:`edge.sidecar.SidecarError`: a corrupt or swapped file is never run.
        """
        path = Path(path)
        runtime = RUNTIME_BY_SUFFIX.get(path.suffix)
        if runtime is None:
            raise ModelLoadError(
                f"{path}: unknown model format {path.suffix!r}; expected one of {sorted(RUNTIME_BY_SUFFIX)}")
        if not path.is_file():
            raise ModelLoadError(f"{path}: model file not found")
        if verify and sidecar_path(path).is_file():
            verify_model_file(path)
        backend_type = _LiteRTBackend if runtime == "tflite" else _OnnxBackend
        try:
            backend = backend_type(path, num_threads, options)
        except Exception as error:  # runtimes raise assorted types for corrupt files
            raise ModelLoadError(
                f"{path}: not a loadable {runtime} model ({type(error).__name__}: {error}); "
                "the file is corrupt or truncated: re-run the convert stage or fetch it again"
            ) from error
        return cls(path, runtime, backend)

    @property
    def input(self) -> TensorInfo:
        return self._backend.input

    @property
    def accelerators(self) -> list[str]:
        """Delegates or execution providers in use besides plain CPU kernels (XNNPACK, CUDA, ...)."""
        return list(self._backend.accelerators)

    @property
    def output(self) -> TensorInfo:
        return self._backend.output

    def _check(self, inputs: np.ndarray) -> np.ndarray:
        inputs = np.asarray(inputs)
        expected = self.input.shape[1:]
        if inputs.ndim != len(self.input.shape) or any(e not in (-1, a) for e, a in zip(expected, inputs.shape[1:])):
            raise InferenceError(
                f"input shape {inputs.shape} does not match the model's {self.input.shape} (batch first)")
        if not np.issubdtype(inputs.dtype, np.number):
            raise InferenceError(f"input dtype {inputs.dtype} is not numeric")
        return inputs.astype(np.float32, copy=False)

    def predict(self, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Float32 outputs for a float32 batch ``inputs`` (N, ...), run ``batch_size`` rows at a time."""
        inputs = self._check(inputs)
        outputs = [self._run(inputs[start:start + batch_size]) for start in range(0, len(inputs), batch_size)]
        return np.concatenate(outputs) if outputs else np.empty((0,) + self.output.shape[1:], np.float32)

    def prepare(self, batch: np.ndarray) -> np.ndarray:
        """A float32 batch as the runtime's input tensor (quantized when the model's input is)."""
        feed = quantize(batch, self.input) if self.input.quantized else batch.astype(self.input.dtype)
        return np.ascontiguousarray(feed)

    def invoke(self, feed: np.ndarray) -> np.ndarray:
        """The runtime alone on a :meth:`prepare`-d input: set input, invoke, read output (what TFLite's
        ``benchmark_model`` times); the raw output tensor."""
        return self._backend.run(feed)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        raw = self.invoke(self.prepare(batch))
        return dequantize(raw, self.output) if self.output.quantized else raw.astype(np.float32)
