"""Stage contracts: every file a stage writes or reads, and the typed records passed between stages.

One :class:`~tasks.workspace.Workspace` root builds every path (DVC stages use the repository root; a flow run, a
benchmark or a test can use a scratch folder). Stages never import each other: a stage writes its
record here and the next stage (or flow) reads it back, typed. Each ``read_*`` names the stage to run
when its file is missing, and each ``write_*`` is atomic, so a crash never leaves half a file.

    prepare  -> PreparedData   (data/prepared/*.npz, dataset.json)
    train    -> TrainSummary   (models/keras/*.h5, train_summary.json, reference_outputs.npz)
    convert  -> ConversionResult rows (models/variants/<variant>.<suffix> + sidecars, conversion.json)
    evaluate -> Evaluation     (reports/evaluation.json, metrics.json, comparison.*)
    benchmark -> BenchmarkSummary (reports/benchmark/: summary.json, <device>.json, devices.md/.csv/.png)
    register -> Registration   (reports/registration.json)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from edge.files import atomic_write_text
from tasks.errors import StageError
from tasks.workspace import SPLITS, Workspace, clear_stage_outputs, load_arrays, require, save_arrays


class Record(BaseModel):
    """A typed record one stage hands to the next (JSON on disk, the same object in a flow)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


def _write_record(path: Path, record: BaseModel) -> Path:
    atomic_write_text(path, record.model_dump_json(indent=2) + "\n")
    return path


RecordType = TypeVar("RecordType", bound=BaseModel)


def _read_record(path: Path, record_type: type[RecordType], stage: str) -> RecordType:
    """A record a stage wrote; a clear error when it is missing, unreadable or from another version."""
    try:
        return record_type.model_validate_json(require(path, stage).read_text())
    except (OSError, ValidationError) as error:
        raise StageError(f"{path} cannot be read as the {stage} stage's record ({str(error).splitlines()[0]}); "
                         f"re-run the {stage} stage (it may come from another edgeloop version)") from error


# ---- prepare ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Dataset:
    """Images as float32 NHWC in [0, 1], integer labels and class names."""

    x: np.ndarray
    y: np.ndarray
    labels: list[str]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(int(d) for d in self.x.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class PreparedData:
    """The splits every later stage reads, plus the calibration samples for int8 conversion."""

    train: Dataset
    val: Dataset
    test: Dataset
    representative: np.ndarray


class DatasetInfo(Record):
    source: str
    labels: list[str]
    input_shape: list[int]
    num_classes: int
    counts: dict[str, int]
    representative: int


def write_prepared(workspace: Workspace, prepared: PreparedData, source: str) -> DatasetInfo:
    """Write the splits as .npz files plus ``dataset.json`` describing them (written last)."""
    clear_stage_outputs(workspace, "prepare")  # dataset.json, written last, marks a complete set
    for name in SPLITS:
        split: Dataset = getattr(prepared, name)
        save_arrays(workspace.split_file(name), x=split.x, y=split.y)
    save_arrays(workspace.representative_file, x=prepared.representative)
    info = DatasetInfo(source=source, labels=prepared.train.labels, input_shape=list(prepared.train.input_shape),
                       num_classes=len(prepared.train.labels),
                       counts={name: int(len(getattr(prepared, name).y)) for name in SPLITS},
                       representative=int(len(prepared.representative)))
    _write_record(workspace.dataset_file, info)
    return info


def read_prepared(workspace: Workspace) -> PreparedData:
    """What :func:`write_prepared` wrote; a clear error when the prepare stage has not run."""
    info = _read_record(workspace.dataset_file, DatasetInfo, "prepare")

    def read(name: str) -> Dataset:
        arrays = load_arrays(workspace.split_file(name), "prepare")
        return Dataset(arrays["x"], arrays["y"], info.labels)

    representative = load_arrays(workspace.representative_file, "prepare")["x"]
    return PreparedData(read("train"), read("val"), read("test"), representative)


# ---- train --------------------------------------------------------------------------------------
class BaselineSummary(Record):
    file: str
    val_accuracy: float
    test_accuracy: float


class PtqCheck(Record):
    val_accuracy: float
    drop_pts: float


class BatchNormCheck(Record):
    """Inference vs training mode after one fine-tuning step, and whether the statistics were re-estimated."""

    step: str  # baseline | qat | pruning | pqat
    layers: int  # BatchNorm layers in the model (0: nothing to check)
    inference_accuracy: float | None
    training_mode_accuracy: float | None
    reestimated: bool = False
    inference_accuracy_after: float | None = None


class QatSummary(Record):
    trained: bool = False
    reason: str
    file: str | None = None
    mode: str = ""  # full | partial | fallback_ptq
    unsupported_layers: list[str] = Field(default_factory=list)
    error: str = ""
    val_accuracy: float | None = None


class PruneTrial(Record):
    target_sparsity: float
    measured_sparsity: float
    val_accuracy: float
    drop_pts: float


class PrunedInt8(Record):
    method: str  # pqat | ptq
    reason: str
    file: str


class PruningSummary(Record):
    """The sparsity search; ``error`` (and no files) when tfmot could not prune the model."""

    trials: list[PruneTrial] = Field(default_factory=list)
    within_budget: bool = False
    sparsity: float | None = None
    file: str | None = None
    int8: PrunedInt8 | None = None
    error: str = ""
    unsupported_layers: list[str] = Field(default_factory=list)


class ClusterTrial(Record):
    clusters: int
    val_accuracy: float
    drop_pts: float


class ClusteringSummary(Record):
    """One clustering search (of the baseline, or sparsity-preserving of the pruned model) and its int8 source
    model; ``error`` (and no file) when it could not run: tfmot refused a layer, a count does not fit one, or the
    model it starts from is missing."""

    of: Literal["baseline", "pruned"]
    trials: list[ClusterTrial] = Field(default_factory=list)
    within_budget: bool = False
    clusters: int | None = None
    sparsity: float | None = None  # kernel sparsity after clustering (kept from pruning when preserved)
    int8: PrunedInt8 | None = None  # method cqat | pcqat | ptq, and the file the int8 variant is built from
    error: str = ""


class QualityFloor(Record):
    """The float32 baseline against the chance floor, on the validation set."""

    val_accuracy: float
    majority_rate: float  # accuracy of always answering the most frequent class
    floor: float  # majority_rate + train.min_gain_over_chance * (1 - majority_rate)


class TrainSummary(Record):
    model: str
    params_count: int
    input_shape: list[int]
    labels: list[str]
    output: Literal["probabilities", "logits"] = "probabilities"  # what the trained head emits (logits: softmax
    # appended on export, so every variant emits probabilities)
    quality: QualityFloor
    batchnorm: list[BatchNormCheck] = Field(default_factory=list)
    baseline: BaselineSummary
    ptq_check: PtqCheck
    qat: QatSummary
    pruning: PruningSummary | None = None  # None when pruning is disabled
    clustering: list[ClusteringSummary] = Field(default_factory=list)  # empty when clustering is disabled

    def metrics(self) -> dict[str, float | int | None]:
        """The headline numbers, flat, for ``dvc metrics``."""
        return {"baseline_val_accuracy": self.baseline.val_accuracy,
                "baseline_test_accuracy": self.baseline.test_accuracy,
                "ptq_val_drop_pts": self.ptq_check.drop_pts, "qat_val_accuracy": self.qat.val_accuracy,
                "pruned_sparsity": self.pruning.sparsity if self.pruning else None,
                **{f"{summary.of}_clusters": summary.clusters for summary in self.clustering},
                "params_count": self.params_count}


def write_train_summary(workspace: Workspace, summary: TrainSummary) -> None:
    _write_record(workspace.train_summary_file, summary)
    atomic_write_text(workspace.train_metrics_file, json.dumps(summary.metrics(), indent=2) + "\n")


def read_train_summary(workspace: Workspace) -> TrainSummary:
    return _read_record(workspace.train_summary_file, TrainSummary, "train")


def write_reference_outputs(workspace: Workspace, probabilities: np.ndarray, labels: np.ndarray) -> None:
    """The float32 Keras model's test-set probabilities: the yardstick of every variant."""
    save_arrays(workspace.reference_outputs_file, probabilities=probabilities, labels=labels)


def read_reference_outputs(workspace: Workspace) -> np.ndarray:
    return load_arrays(workspace.reference_outputs_file, "train")["probabilities"]


# ---- convert ------------------------------------------------------------------------------------
class ConversionResult(Record):
    variant: str
    status: str  # ok | failed | skipped
    file: str | None = None
    method: str = ""
    error: str = ""
    seconds: float = 0.0


class ConversionResults(Record):
    results: list[ConversionResult]


def write_conversion(workspace: Workspace, results: list[ConversionResult]) -> None:
    _write_record(workspace.conversion_file, ConversionResults(results=results))


def read_conversion(workspace: Workspace) -> list[ConversionResult]:
    return _read_record(workspace.conversion_file, ConversionResults, "convert").results


# ---- evaluate -----------------------------------------------------------------------------------
class VariantRow(Record):
    """One variant measured in its device runtime, gated and checked against every device."""

    variant: str
    status: str  # ok | failed | skipped (from conversion) or failed (evaluation error)
    runtime: str = ""
    method: str = ""
    error: str = ""
    accuracy: float | None = None
    accuracy_drop_pts: float | None = None
    agreement: float | None = None
    max_abs_diff: float | None = None
    size_bytes: int | None = None
    gzip_bytes: int | None = None
    weight_bytes: int | None = None  # constant tensors only (no container overhead)
    size_reduction: float | None = None  # tflite_fp32 file size / this file's size
    weight_reduction: float | None = None  # tflite_fp32 weight bytes / this variant's weight bytes
    sparsity: float | None = None  # of the Keras model it was converted from
    file_sparsity: float | None = None  # exact zeros among the kernels stored in the file itself
    max_distinct_weights: int | None = None  # per kernel (per channel when quantized per channel), from the file
    bundle_bytes: int | None = None  # gzip of what a bundle carries for it (model file + sidecar): sent per device
    fleet_bytes: int | None = None  # bundle_bytes x the devices of the fleet file, when there is one
    latency_p50_ms: float | None = None
    latency_p95_ms: float | None = None
    model_rss_bytes: int | None = None
    peak_rss_bytes: int | None = None
    gates_passed: bool = False
    gate_failures: list[str] = Field(default_factory=list)
    devices: dict[str, str] = Field(default_factory=dict)


class Evaluation(Record):
    recommended: str | None
    recommend_by: str
    gates: dict[str, Any]
    rows: list[VariantRow]
    failure: str = ""  # why nothing passed (empty when a variant is recommended)

    def row(self, variant: str) -> VariantRow:
        return next(row for row in self.rows if row.variant == variant)


def write_evaluation(workspace: Workspace, evaluation: Evaluation) -> None:
    _write_record(workspace.evaluation_file, evaluation)


def read_evaluation(workspace: Workspace) -> Evaluation:
    return _read_record(workspace.evaluation_file, Evaluation, "evaluate")


# ---- benchmark ----------------------------------------------------------------------------------
class DeviceBenchRow(Record):
    """One variant in one runtime configuration measured on one device (or why it could not be)."""

    device: str
    variant: str
    config: str = "default"
    runner: str
    status: Literal["ok", "error"]
    error: str = ""
    emulated: bool = False
    arch: str | None = None
    runtime: str | None = None
    accelerators: list[str] = Field(default_factory=list)
    fallback: list[str] = Field(default_factory=list)
    size_bytes: int | None = None
    init_ms: float | None = None
    first_inference_ms: float | None = None
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    throughput_ips: float | None = None
    peak_rss_bytes: int | None = None
    accuracy: float | None = None          # on the device, on the eval subset
    accuracy_drop_pts: float | None = None  # float32 Keras model on the same subset minus the device's
    host_agreement: float | None = None     # share of eval samples labelled as the same variant does on the host
    energy_mj: float | None = None          # per inference; None: no power sensor
    throttled: bool | None = None
    gates_passed: bool = False
    gate_failures: list[str] = Field(default_factory=list)
    gate_notes: list[str] = Field(default_factory=list)  # gates not applied and why (e.g. emulated timings)


class DeviceOutcome(Record):
    """How benchmarking one device went as a whole."""

    device: str
    runner: str
    status: Literal["ok", "error"]
    error: str = ""
    emulated: bool = False
    recommended: str | None = None         # best variant passing every device gate
    recommended_config: str | None = None


class BenchmarkSummary(Record):
    recommend_by: str
    eval_samples: int
    reference_accuracy: float  # the float32 Keras model on the same eval subset
    devices: list[DeviceOutcome]
    rows: list[DeviceBenchRow]

    def recommended(self) -> dict[str, str | None]:
        return {outcome.device: outcome.recommended for outcome in self.devices}


def write_benchmark(workspace: Workspace, summary: BenchmarkSummary) -> None:
    _write_record(workspace.benchmark_file, summary)


def read_benchmark(workspace: Workspace) -> BenchmarkSummary:
    return _read_record(workspace.benchmark_file, BenchmarkSummary, "benchmark")


# ---- register -----------------------------------------------------------------------------------
class Registration(Record):
    run_id: str
    experiment_id: str
    tracking_uri: str
    registered_model: str
    version: str
    alias: str
    variant: str
    data_version: str
    model_uri: str  # the MLflow pyfunc model of the registered variant


def write_registration(workspace: Workspace, registration: Registration) -> None:
    _write_record(workspace.registration_file, registration)


def read_registration(workspace: Workspace) -> Registration:
    return _read_record(workspace.registration_file, Registration, "register")
