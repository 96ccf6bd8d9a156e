"""Where every stage output lives: one :class:`Workspace` root builds every path.

``dvc repro`` uses the repository root; a flow run, a benchmark or a test can use a scratch folder.
Stage inputs that are not outputs of another stage (``data.path``, ``train.model_path``,
``retrain.labelled_dir``, ``drift.collected_dir``) are parameters and resolve from the current folder.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.files import atomic_write_bytes
from edge.sidecar import sidecar_path
from tasks.errors import StageError
from tasks.variants import VARIANTS

SPLITS = ("train", "val", "test")
KERAS_MODELS = ("baseline", "qat", "pruned", "pruned_qat")  # what the train stage may save


@dataclass(frozen=True)
class Workspace:
    """Where every stage output lives, under one root (the repository root for ``dvc repro``)."""

    root: Path = Path(".")

    @property
    def prepared_dir(self) -> Path:
        return self.root / "data" / "prepared"

    @property
    def keras_dir(self) -> Path:
        return self.root / "models" / "keras"

    @property
    def variants_dir(self) -> Path:
        return self.root / "models" / "variants"

    @property
    def reports_dir(self) -> Path:
        return self.root / "reports"

    @property
    def lock_file(self) -> Path:
        """Held by a flow run while it writes this workspace's outputs."""
        return self.root / ".edgeloop-outputs.lock"

    # ---- files inside the folders -------------------------------------------------------------
    def split_file(self, split: str) -> Path:
        return self.prepared_dir / f"{split}.npz"

    @property
    def representative_file(self) -> Path:
        return self.prepared_dir / "representative.npz"

    @property
    def dataset_file(self) -> Path:
        return self.prepared_dir / "dataset.json"

    def keras_model(self, name: str) -> Path:
        """``baseline``, ``qat``, ``pruned`` or ``pruned_qat``: a Keras model the train stage saved."""
        return self.keras_dir / f"{name}.h5"

    @property
    def reference_outputs_file(self) -> Path:
        return self.keras_dir / "reference_outputs.npz"

    @property
    def train_summary_file(self) -> Path:
        return self.keras_dir / "train_summary.json"

    @property
    def train_metrics_file(self) -> Path:
        return self.reports_dir / "train_metrics.json"

    def variant_file(self, variant: str) -> Path:
        return self.variants_dir / VARIANTS[variant].filename()

    @property
    def conversion_file(self) -> Path:
        return self.variants_dir / "conversion.json"

    @property
    def evaluation_file(self) -> Path:
        return self.reports_dir / "evaluation.json"

    @property
    def metrics_file(self) -> Path:
        return self.reports_dir / "metrics.json"

    def comparison_file(self, suffix: str) -> Path:
        """``comparison.csv``, ``.md`` or ``.png``: the human-readable variant matrix."""
        return self.reports_dir / f"comparison.{suffix}"

    @property
    def benchmark_dir(self) -> Path:
        """On-device benchmark results: one raw ``edge.bench`` document per device plus the summary."""
        return self.reports_dir / "benchmark"

    @property
    def benchmark_file(self) -> Path:
        return self.benchmark_dir / "summary.json"

    def benchmark_device_file(self, device: str) -> Path:
        return self.benchmark_dir / f"{device}.json"

    def benchmark_report(self, suffix: str) -> Path:
        """``devices.md``, ``.csv`` or ``.png``: per-device tables and the latency-accuracy chart."""
        return self.benchmark_dir / f"devices.{suffix}"

    @property
    def registration_file(self) -> Path:
        return self.reports_dir / "registration.json"

    @property
    def package_file(self) -> Path:
        return self.reports_dir / "package.json"

    @property
    def devices_csv(self) -> Path:
        """The inventory as a table (``edgeloop devices``)."""
        return self.reports_dir / "devices.csv"


    def stage_outputs(self, stage: str) -> list[Path]:
        """Every file ``stage`` writes: removed before it runs, so a failed run leaves nothing stale behind."""
        if stage == "prepare":
            return [self.dataset_file, self.representative_file, *(self.split_file(split) for split in SPLITS)]
        if stage == "train":
            return [self.train_summary_file, self.train_metrics_file, self.reference_outputs_file,
                    *(self.keras_model(name) for name in KERAS_MODELS)]
        if stage == "convert":
            files = [self.variant_file(name) for name in VARIANTS]
            return [self.conversion_file, *files, *(sidecar_path(file) for file in files)]
        if stage == "evaluate":
            return [self.evaluation_file, self.metrics_file, *(self.comparison_file(s) for s in ("csv", "md", "png"))]
        if stage == "benchmark":
            found = sorted(self.benchmark_dir.glob("*.json")) if self.benchmark_dir.is_dir() else []
            return [self.benchmark_file, *found, *(self.benchmark_report(s) for s in ("csv", "md", "png"))]
        if stage == "register":
            return [self.registration_file]
        raise ValueError(f"unknown stage {stage!r}")


def clear_stage_outputs(workspace: Workspace, stage: str) -> None:
    """Remove what ``stage`` wrote last time (DVC does this before a stage; flows and the CLI call this)."""
    for path in workspace.stage_outputs(stage):
        path.unlink(missing_ok=True)


def require(path: Path, stage: str) -> Path:
    """``path`` if it exists, else a clear error naming the stage to run."""
    if not path.is_file():
        raise StageError(f"{path} not found; run the {stage} stage first (dvc repro {stage}, or edgeloop {stage})")
    return path


def save_arrays(path: Path, **arrays: np.ndarray) -> None:
    """``np.savez_compressed``, written atomically."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())


def load_arrays(path: Path, stage: str) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` a stage wrote; a clear error when it is missing or unreadable."""
    try:
        with np.load(require(path, stage), allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (OSError, ValueError) as error:
        raise StageError(f"{path} is unreadable ({error}); re-run the {stage} stage") from error
