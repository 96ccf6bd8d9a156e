"""``edgeloop simulate-drift``: realistically shifted device uploads, built from the prepared test split.

    edgeloop simulate-drift [--workspace W] [--model FILE] [--severity none|low|medium|high]
                            [--kinds brightness,noise,blur] [--devices 3] [--samples 300] [--windows 1]
                            [--window-minutes 60] [--seed 0] [--no-raw] [--out DIR]

Each window draws ``--samples`` rows of the test split, shifts them (:func:`shift_all`), runs the edge model
on every row alone, as a device serves a request, and writes one sample file per device into ``--out``
(default ``drift.collected_dir``) as ``<device>--sim-<window>-<severity>-<run>.npz``: the name ``edgeloop
ingest`` stores an upload under, with the content ``edge.sampling.segments.segment_npz_bytes`` closes. ``latency_ms``
is timed on this host (one ``predict`` call per row), not on a device. Windows are ``--window-minutes``
apart and the last one ends now.

Kinds, applied in :data:`APPLY_ORDER`: ``rotation`` (a tilted camera), ``blur`` (defocus), ``noise`` (sensor
noise), ``brightness`` (overexposure), ``contrast`` (a washed-out image), ``occlusion`` (a square patch at
the data's minimum: a smudge) and ``prior`` (two classes dominate). Default: brightness + noise + blur, a
camera moved into other light. :data:`SCALES` is calibrated for the drift check (normed Wasserstein >= 0.1
per feature, dataset drift from a 50% share) on 300-row windows of the digits test split against the
training split; share of drifted features for the default mix, mean [min-max] of 20 windows:

    none 0.17 [0.00-0.35]   low 0.48 [0.41-0.59]   medium 0.94 [0.94-0.94]   high 0.99 [0.94-1.00]
"""

from __future__ import annotations

import argparse
import logging
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from edge.errors import SidecarError
from edge.features import feature_names, features, sample_layout
from edge.files import atomic_write_bytes, sha256_file
from edge.identity import DEVICE_ID_RULE, is_device_id, stored_upload_name
from edge.runtime import EdgeModel
from edge.sampling.segments import ParsedSegment, segment_npz_bytes
from edge.sidecar import read_sidecar
from tasks.config import PARAMS_FILE, load_params
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError, StageError
from tasks.workspace import Workspace, load_arrays

LOGGER = logging.getLogger(__name__)
SEVERITIES = ("none", "low", "medium", "high")
APPLY_ORDER = ("prior", "rotation", "occlusion", "blur", "contrast", "brightness", "noise")  # scene to sensor
KINDS = tuple(sorted(APPLY_ORDER))
DEFAULT_KINDS = ("brightness", "noise", "blur")
# magnitude per kind at low / medium / high: rotation degrees, blur sigma in pixels, noise std and brightness
# offset as shares of the value range, contrast: share of each sample's spread around its mean lost,
# occlusion: patch side as a share of the image side, prior: share of rows from the two dominant classes
# (about 0.2 unshifted among ten). The digits features are tight: 0.006 of the range in brightness drifts.
SCALES: dict[str, tuple[float, float, float]] = {
    "rotation": (9.0, 15.0, 30.0),
    "blur": (0.28, 0.5, 0.8),
    "noise": (0.012, 0.06, 0.15),
    "brightness": (0.006, 0.03, 0.1),
    "contrast": (0.01, 0.05, 0.3),
    "occlusion": (0.125, 0.25, 0.5),
    "prior": (0.35, 0.6, 0.85),
}
REASON = "rate"  # what a device's rate sampler writes: simulated rows are a plain sample of the traffic
Predictor = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # batch -> probabilities (N, C), latency_ms (N,)


def magnitude(kind: str, severity: str) -> float:
    """How strong ``kind`` is at ``severity`` (0 for ``none``), from :data:`SCALES`."""
    if kind not in SCALES or severity not in SEVERITIES:
        raise ConfigError(f"unknown kind {kind!r} or severity {severity!r}; kinds: {', '.join(KINDS)}, "
                          f"severities: {', '.join(SEVERITIES)}")
    return 0.0 if severity == "none" else SCALES[kind][SEVERITIES.index(severity) - 1]


def _prior(x: np.ndarray, y: np.ndarray, share: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    classes = np.unique(y)
    dominant = rng.choice(classes, size=min(2, len(classes)), replace=False)
    favoured = np.isin(y, dominant)
    if favoured.all():
        return x, y
    weights = np.where(favoured, share / favoured.sum(), (1.0 - share) / (~favoured).sum())
    rows = rng.choice(len(y), size=len(y), p=weights / weights.sum())
    return x[rows], y[rows]


def _occlude(images: np.ndarray, side_share: float, low: float, rng: np.random.Generator) -> np.ndarray:
    count, rows, cols, _ = images.shape
    side = min(max(1, round(side_share * min(rows, cols))), rows, cols)
    top = rng.integers(0, rows - side + 1, count)[:, None, None]
    left = rng.integers(0, cols - side + 1, count)[:, None, None]
    row_index, col_index = np.arange(rows)[None, :, None], np.arange(cols)[None, None, :]
    patch = (row_index >= top) & (row_index < top + side) & (col_index >= left) & (col_index < left + side)
    images[patch] = low
    return images


def shift(x: np.ndarray, y: np.ndarray, kind: str, severity: str, rng: np.random.Generator,
          bounds: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One kind of shift at ``severity``: new ``(x, y)`` with ``x``'s shape, float32, clipped to ``bounds``.

    Args:
        x: samples ``(N, ...)`` as the model takes them; images are ``(N, H, W[, C])``.
        y: their labels; only ``prior`` changes them (it resamples rows).
        bounds: the valid value range, default ``x``'s own min and max (pass the data set's for a subset).
    """
    amount = magnitude(kind, severity)
    x = np.asarray(x, np.float32)
    if amount == 0.0 or len(x) == 0:
        return x.copy(), np.asarray(y).copy()
    if kind == "prior":
        shifted, y = _prior(x, np.asarray(y), amount, rng)
        return shifted.copy(), y.copy()
    low, high = bounds if bounds is not None else (float(x.min()), float(x.max()))
    spread = high - low
    images = x.reshape(len(x), *sample_layout(x.shape[1:])).copy()  # (N, rows, cols, channels) as edge.features
    jitter = 1.0 + 0.25 * rng.standard_normal(len(x))  # devices and scenes vary around the typical shift
    if kind == "rotation":  # a tilted camera: one direction, a jittered angle
        # nearest neighbour: on 8x8 digits linear interpolation blurs enough to drift at any angle
        for index, angle in enumerate(amount * jitter):
            images[index] = ndimage.rotate(images[index], angle, axes=(0, 1), reshape=False, order=0,
                                           mode="grid-constant", cval=low)
    elif kind == "blur":
        images = ndimage.gaussian_filter(images, sigma=(0.0, amount, amount, 0.0), mode="nearest")
    elif kind == "noise":
        images += rng.normal(0.0, amount * spread, images.shape).astype(np.float32)
    elif kind == "brightness":
        images += (amount * spread * jitter).astype(np.float32)[:, None, None, None]
    elif kind == "contrast":
        means = images.mean(axis=(1, 2, 3), keepdims=True)
        images = means + (images - means) * (1.0 - amount)
    else:
        images = _occlude(images, amount, low, rng)
    return np.clip(images, low, high).astype(np.float32).reshape(x.shape), np.asarray(y).copy()


def shift_all(x: np.ndarray, y: np.ndarray, kinds: Sequence[str], severity: str, rng: np.random.Generator,
              bounds: tuple[float, float] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Every kind in ``kinds`` at ``severity``, in :data:`APPLY_ORDER` whatever order they are given in."""
    bounds = bounds if bounds is not None or len(x) == 0 else (float(np.min(x)), float(np.max(x)))
    for kind in sorted(set(kinds), key=lambda name: APPLY_ORDER.index(name) if name in APPLY_ORDER else -1):
        x, y = shift(x, y, kind, severity, rng, bounds)
    return np.asarray(x, np.float32), np.asarray(y)


def timed_predictor(model: EdgeModel) -> Predictor:
    """``model`` run on one row at a time, as a device serves requests; latency timed on this host."""
    def predict(batch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        outputs, latency_ms = [], np.empty(len(batch), np.float32)
        for index in range(len(batch)):
            started = time.perf_counter()
            outputs.append(model.predict(batch[index:index + 1]))
            latency_ms[index] = (time.perf_counter() - started) * 1000.0
        return np.concatenate(outputs).astype(np.float32), latency_ms
    return predict


@dataclass(frozen=True)
class Window:
    """One simulated window: shifted rows, what the model made of them, and when they were served."""

    x: np.ndarray              # (N, ...) float32 shifted inputs
    y: np.ndarray              # (N,) their labels (after a prior shift)
    probabilities: np.ndarray  # (N, classes) float32
    latency_ms: np.ndarray     # (N,) float32
    timestamps: np.ndarray     # (N,) float64 unix seconds, ascending

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1).astype(np.int32)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1).astype(np.float32)

    @property
    def accuracy(self) -> float:
        return float(np.mean(self.predicted == self.y))


def simulate_window(x: np.ndarray, y: np.ndarray, predict: Predictor, severity: str, kinds: Sequence[str],
                    rng: np.random.Generator, samples: int, start: float, end: float) -> Window:
    """``samples`` rows of ``(x, y)`` (without replacement while there are enough), shifted and predicted,
    with timestamps spread over ``[start, end)``; values stay within ``x``'s range."""
    if samples < 1 or len(x) == 0 or len(x) != len(y):
        raise ConfigError(f"a window needs samples >= 1 from a non-empty split, got {samples} from {len(x)} rows")
    rows = rng.choice(len(x), size=samples, replace=samples > len(x))
    shifted, labels = shift_all(x[rows], y[rows], kinds, severity, rng, (float(np.min(x)), float(np.max(x))))
    probabilities, latency_ms = predict(shifted)
    timestamps = np.sort(rng.uniform(start, end, samples))
    return Window(shifted, labels, np.asarray(probabilities, np.float32), np.asarray(latency_ms, np.float32),
                  timestamps)


def sample_file_bytes(window: Window, rows: np.ndarray, device_id: str, model_version: str,
                      raw: bool = True) -> bytes:
    """The ``.npz`` a device's sample store closes holding ``rows`` of ``window`` (segment_npz_bytes' format)."""
    x, confidence, predicted = window.x[rows], window.confidence[rows], window.predicted[rows]
    metas = [{"id": uuid.uuid4().hex, "t": float(window.timestamps[row]), "c": float(confidence[index]),
              "p": int(predicted[index]), "l": float(window.latency_ms[row]), "v": model_version,
              "r": REASON, "d": device_id} for index, row in enumerate(rows)]
    parsed = ParsedSegment(header={"feature_names": feature_names(x.shape[1:])}, metas=metas,
                           features=list(features(x)), inputs=list(x) if raw else [])
    return segment_npz_bytes(parsed)


def write_uploads(window: Window, out_dir: Path, devices: Sequence[str], model_version: str, window_index: int,
                  severity: str, run_id: str, raw: bool = True) -> list[Path]:
    """One sample file per device (rows dealt round-robin, so each spans the window), written atomically as
    ``<device>--sim-<window>-<severity>-<run>.npz``, the name ``edgeloop ingest`` stores an upload under
    (:func:`edge.identity.stored_upload_name`)."""
    written = []
    for position, device_id in enumerate(devices):
        rows = np.arange(position, len(window.timestamps), len(devices))
        if len(rows):
            path = Path(out_dir) / stored_upload_name(device_id, f"sim-{window_index:03d}-{severity}-{run_id}.npz")
            atomic_write_bytes(path, sample_file_bytes(window, rows, device_id, model_version, raw))
            written.append(path)
    return written


def default_model(workspace: Workspace) -> Path:
    """The workspace's ``tflite_int8`` variant, else its ``tflite_fp32``."""
    for variant in ("tflite_int8", "tflite_fp32"):
        if workspace.variant_file(variant).is_file():
            return workspace.variant_file(variant)
    raise StageError(f"no tflite_int8 or tflite_fp32 model in {workspace.variants_dir}; run the convert stage "
                     "(edgeloop convert) or pass --model FILE")


def model_version_of(path: Path) -> str:
    """The sidecar's ``version`` or ``data_version``, else the first 12 hex digits of the file's sha256."""
    try:
        sidecar = read_sidecar(path)
    except SidecarError:
        sidecar = {}
    return str(sidecar.get("version") or sidecar.get("data_version") or sha256_file(path)[:12])


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--kinds``: a comma list of :data:`KINDS` (argparse reports what is wrong)."""
    kinds = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [kind for kind in kinds if kind not in KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown kinds {unknown or [text]}; choose from {', '.join(KINDS)}")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop simulate-drift",
                                     description="write shifted device uploads built from the prepared test split")
    parser.add_argument("--workspace", type=Path, default=Path("."), help="workspace root (default: .)")
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
    parser.add_argument("--model", type=Path, help="edge model file (default: the workspace's tflite_int8, "
                        "else tflite_fp32)")
    parser.add_argument("--model-version", help="model_version column (default: from the model's sidecar, "
                        "else its sha256)")
    parser.add_argument("--severity", choices=SEVERITIES, default="medium", help="default: %(default)s")
    parser.add_argument("--kinds", type=parse_kinds, default=DEFAULT_KINDS,
                        help=f"comma list of {', '.join(KINDS)} (default: {','.join(DEFAULT_KINDS)})")
    parser.add_argument("--devices", type=int, default=3, help="devices uploading (default: %(default)s)")
    parser.add_argument("--device-prefix", default="sim", help="device ids <prefix>-00, ... (default: sim)")
    parser.add_argument("--samples", type=int, default=300, help="rows per window, all devices (default: 300)")
    parser.add_argument("--windows", type=int, default=1, help="windows (default: %(default)s)")
    parser.add_argument("--window-minutes", type=float, default=60.0, help="window length (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--raw", action=argparse.BooleanOptionalAction, default=True,
                        help="store the raw inputs x too (default: on)")
    parser.add_argument("--out", type=Path, help="where the uploads go (default: drift.collected_dir)")
    return parser


def _check(args: argparse.Namespace) -> list[str]:
    """The device ids; :class:`ConfigError` for counts and names that cannot work."""
    if args.devices < 1 or args.windows < 1 or args.window_minutes <= 0:
        raise ConfigError(f"--devices ({args.devices}) and --windows ({args.windows}) must be at least 1 and "
                          f"--window-minutes ({args.window_minutes}) positive")
    if args.samples < args.devices:
        raise ConfigError(f"--samples ({args.samples}) must be at least --devices ({args.devices}): every "
                          "device uploads a file per window")
    devices = [f"{args.device_prefix}-{index:02d}" for index in range(args.devices)]
    if not all(is_device_id(device) for device in devices):
        raise ConfigError(f"--device-prefix {args.device_prefix!r} makes invalid device ids like {devices[0]!r}; "
                          f"a device id is {DEVICE_ID_RULE}")
    return devices


def simulate(args: argparse.Namespace) -> list[Path]:
    """What the command does, for parsed arguments; returns the files written."""
    devices = _check(args)
    workspace = Workspace(args.workspace)
    test = load_arrays(workspace.split_file("test"), "prepare")
    model_path = args.model or default_model(workspace)
    predict = timed_predictor(EdgeModel.load(model_path))
    version = args.model_version or model_version_of(model_path)
    out_dir = args.out or load_params(args.params).drift.collected_dir
    rng, run_id = np.random.default_rng(args.seed), uuid.uuid4().hex[:8]  # the run id keeps earlier runs' files
    now, length_s = time.time(), args.window_minutes * 60.0
    written = []
    for index in range(args.windows):
        end = now - (args.windows - 1 - index) * length_s
        window = simulate_window(test["x"], test["y"], predict, args.severity, args.kinds, rng, args.samples,
                                 end - length_s, end)
        files = write_uploads(window, out_dir, devices, version, index, args.severity, run_id, args.raw)
        written += files
        print(f"window {index + 1}/{args.windows}: {len(files)} files, {len(window.y)} rows, severity "
              f"{args.severity}, kinds {','.join(args.kinds)}, mean confidence {window.confidence.mean():.3f}, "
              f"accuracy {window.accuracy:.3f} (shifted labels) -> {out_dir}")
    LOGGER.info("wrote %d files for model %s (version %s)", len(written), model_path, version)
    return written


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    return report_user_errors(lambda: simulate(args))


if __name__ == "__main__":
    raise SystemExit(main())
