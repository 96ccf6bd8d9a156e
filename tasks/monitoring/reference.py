"""A model's drift reference: what its training data looked like to the devices' feature function.

Built at registration from the training split (``drift.reference_rows`` samples, seeded) with
:func:`edge.features.features`, the function devices run on what they serve, plus the registered
variant's predicted class and confidence on the same samples. It is logged with the model version's
MLflow run at :data:`REFERENCE_ARTIFACT`, so the champion's reference always matches the model devices
serve. The drift check compares each window of collected features with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.features import feature_names, features
from edge.files import atomic_write_bytes
from tasks.errors import DataError

REFERENCE_ARTIFACT = "drift/reference.npz"  # path of the reference in the model version's MLflow run
ARRAYS = ("features", "feature_names", "predicted", "confidence")


@dataclass(frozen=True)
class Reference:
    features: np.ndarray        # (N, F) float32
    feature_names: tuple[str, ...]
    predicted: np.ndarray       # (N,) int32 class index from the model
    confidence: np.ndarray      # (N,) float32 top-class probability


def build_reference(x: np.ndarray, probabilities: np.ndarray, max_rows: int, seed: int) -> Reference:
    """The reference of a model: ``max_rows`` seeded training samples, their features and the model's outputs."""
    if len(x) == 0 or len(x) != len(probabilities):
        raise DataError(f"a drift reference needs as many outputs as samples, got {len(x)} samples and "
                        f"{len(probabilities)} outputs")
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=min(max_rows, len(x)), replace=False))
    probabilities = np.asarray(probabilities, np.float32)[rows]
    return Reference(features(np.asarray(x[rows], np.float32)).astype(np.float32),
                     tuple(feature_names(tuple(x.shape[1:]))),
                     probabilities.argmax(axis=1).astype(np.int32), probabilities.max(axis=1))


def write_reference(path: Path, reference: Reference) -> None:
    import io

    buffer = io.BytesIO()
    np.savez_compressed(buffer, features=reference.features, feature_names=np.array(reference.feature_names, str),
                        predicted=reference.predicted, confidence=reference.confidence)
    atomic_write_bytes(Path(path), buffer.getvalue())


def read_reference(path: Path) -> Reference:
    """Load and check a reference file; :class:`DataError` names what is wrong with it."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [name for name in ARRAYS if name not in archive.files]
            if missing:
                raise DataError(f"drift reference {path} lacks {missing}; rebuild it (register the model again)")
            arrays = {name: archive[name] for name in ARRAYS}
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"drift reference {path} is unreadable ({error})") from None
    values = arrays["features"]
    rows = len(values)
    if values.ndim != 2 or arrays["feature_names"].shape != (values.shape[1],) or rows == 0 \
            or arrays["predicted"].shape != (rows,) or arrays["confidence"].shape != (rows,):
        raise DataError(f"drift reference {path} has inconsistent arrays (features {values.shape}, names "
                        f"{arrays['feature_names'].shape}, predicted {arrays['predicted'].shape})")
    if not np.isfinite(values).all():
        raise DataError(f"drift reference {path} has NaN or infinite features")
    return Reference(values.astype(np.float32), tuple(str(n) for n in arrays["feature_names"]),
                     arrays["predicted"].astype(np.int32), arrays["confidence"].astype(np.float32))
