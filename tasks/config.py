"""The one typed configuration of the pipeline, loaded from ``params.yaml``; every stage receives only its section.

Validation happens at load: unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming
the key, the value and what is allowed. Each field is declared once here (bounds, choices, description); the Run
forms and a run's overrides reuse them (``flows/parameters.py``). The environment's overrides (:data:`ENVIRONMENT`)
are applied once, by :func:`load_params`. Where outputs go is not configuration: :mod:`tasks.workspace`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.config_format import flatten, format_validation_error
from tasks.errors import ConfigError

PARAMS_FILE = Path("params.yaml")

VariantName = Literal["tflite_fp32", "tflite_fp16", "tflite_dynamic", "tflite_int8", "tflite_int8_qat",
                      "tflite_int8_pruned", "tflite_int8_clustered", "tflite_int8_pruned_clustered", "tflite_int16x8",
                      "onnx_fp32", "onnx_int8", "onnx_int8_u8s8"]
ZooModel = Literal["digits_cnn", "resnet8", "ds_cnn", "mobilenet_v1_025", "keras_file"]
MODEL_SHAPING_SECTIONS = ("seed", "data", "train", "quantize", "prune", "cluster", "convert")

# ---- fields shared with the Run form (flows/parameters.py) ---------------------------------------
Seed = Annotated[int, Field(ge=0, le=2**31 - 1, description="seed of splits, weight init and shuffling")]
ModelChoice = Annotated[ZooModel, Field(description="model zoo entry, or keras_file to fine-tune model_path")]
ModelPath = Annotated[Path | None, Field(description="keras_file only: a .keras, .h5 or SavedModel path")]
Epochs = Annotated[int, Field(ge=1, le=1000, description="float32 baseline training epochs")]
Strategy = Annotated[Literal["auto", "ptq", "qat"], Field(
    description="auto: PTQ first, QAT only when its accuracy drop exceeds quantize.max_ptq_drop_pts; "
                "ptq: never train for quantization; qat: always run QAT")]
PruneEnabled = Annotated[bool, Field(description="run the pruning search (and build tflite_int8_pruned)")]
Sparsity = Annotated[float, Field(gt=0.0, lt=1.0)]
TargetSparsities = Annotated[list[Sparsity], Field(
    min_length=1, description="pruning sparsities to try, in (0, 1); the highest within the drop budget is kept")]
ClusterEnabled = Annotated[bool, Field(description="run the weight-clustering search (and build the clustered int8 "
                                                   "variants)")]
ClusterCount = Annotated[int, Field(ge=2, le=256)]
RecommendBy = Annotated[Literal["size", "gzip_size", "bundle_bytes", "latency", "accuracy"], Field(
    description="among variants passing every gate, the best by: size on disk, gzip size (what an "
                "over-the-air update downloads), bundle bytes (the gzip payload a rollout sends each device), "
                "host p95 latency, or accuracy")]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(_Section):
    source: Literal["sklearn_digits", "npz", "image_folder"] = "sklearn_digits"
    path: Path | None = None
    image_size: tuple[int, int] = (8, 8)
    color_mode: Literal["grayscale", "rgb"] = "grayscale"
    val_fraction: float = Field(0.15, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.2, gt=0.0, lt=0.5)
    representative_samples: int = Field(200, ge=1, le=10_000)
    sync: Literal["push", "pull"] = Field("push", description=(
        "push: this host's data.path is the truth (a new content is added, pushed to the DVC remote and committed); "
        "pull: the version committed in git is, fetched from the DVC remote before training (a worker host)"))

    @model_validator(mode="after")
    def _path_matches_source(self) -> DataParams:
        if self.source != "sklearn_digits" and self.path is None:
            raise ValueError(f"data.path is required when data.source is {self.source!r}")
        if min(self.image_size) < 4 or max(self.image_size) > 512:
            raise ValueError(f"data.image_size {list(self.image_size)} must be within 4..512 pixels")
        return self


class TrainParams(_Section):
    model: ModelChoice = "digits_cnn"
    model_path: ModelPath = None
    epochs: Epochs = 25
    batch_size: int = Field(32, ge=1, le=4096)
    learning_rate: float = Field(1e-3, gt=0.0, le=1.0)
    min_gain_over_chance: float = Field(0.2, ge=0.0, lt=1.0, description=(  # else: stops before QAT and pruning
        "share of the way from the majority-class rate to 100% the float32 baseline must cover on validation"))
    batchnorm_max_gap_pts: float = Field(5.0, ge=0.0, le=100.0, description=(
        "re-estimate BatchNorm statistics when inference-mode accuracy lags training mode by more than this"))

    @model_validator(mode="after")
    def _model_path_for_keras_file(self) -> TrainParams:
        if self.model == "keras_file" and self.model_path is None:
            raise ValueError("train.model_path is required when train.model is 'keras_file'")
        return self


class QuantizeParams(_Section):
    strategy: Strategy = "auto"
    max_ptq_drop_pts: float = Field(2.0, ge=0.0, le=100.0)
    qat_epochs: int = Field(5, ge=1, le=1000)
    qat_learning_rate: float = Field(1e-4, gt=0.0, le=1.0)


class PruneParams(_Section):
    enabled: PruneEnabled = True
    initial_sparsity: float = Field(0.1, ge=0.0, lt=1.0)
    target_sparsities: TargetSparsities = Field(default_factory=lambda: [0.5, 0.7, 0.8, 0.9])
    max_accuracy_drop_pts: float = Field(1.0, ge=0.0, le=100.0)
    epochs: int = Field(8, ge=1, le=1000)
    learning_rate: float = Field(5e-4, gt=0.0, le=1.0)

    @model_validator(mode="after")
    def _targets_above_initial(self) -> PruneParams:
        for target in self.target_sparsities:
            if not self.initial_sparsity < target < 1.0:
                raise ValueError(
                    f"prune.target_sparsities value {target} must be above "
                    f"prune.initial_sparsity ({self.initial_sparsity}) and below 1.0"
                )
        return self


class ClusterParams(_Section):
    """Weight clustering (tfmot, ``tasks.model.cluster``): at most N distinct values per clustered kernel."""

    enabled: ClusterEnabled = True
    # tried from the most clusters (the most conservative) down; the fewest within the drop budget is kept
    cluster_counts: list[ClusterCount] = Field(default_factory=lambda: [32, 16, 8], min_length=1)
    centroid_init: Literal["kmeans_plus_plus", "density_based", "linear", "random"] = "kmeans_plus_plus"
    layers: list[Literal["Conv2D", "Dense", "DepthwiseConv2D"]] = Field(
        default_factory=lambda: ["Conv2D", "Dense"], min_length=1)  # layer types clustered; others keep theirs
    max_accuracy_drop_pts: float = Field(1.0, ge=0.0, le=100.0)
    epochs: int = Field(3, ge=1, le=1000)
    learning_rate: float = Field(1e-4, gt=0.0, le=1.0)


class ConvertParams(_Section):
    variants: dict[VariantName, bool] = Field(default_factory=lambda: dict.fromkeys(VariantName.__args__, True))
    onnx_opset: int = Field(17, ge=13, le=21)

    @field_validator("variants", mode="before")
    @classmethod
    def _unlisted_variants_stay_on(cls, value: Any) -> Any:
        """A partial map switches off only what it names (``{onnx_int8: false}``), not everything else."""
        return {**dict.fromkeys(VariantName.__args__, True), **value} if isinstance(value, dict) else value

    @field_validator("variants")
    @classmethod
    def _at_least_one_variant(cls, value: dict[str, bool]) -> dict[str, bool]:
        if not any(value.values()):
            raise ValueError("every variant is switched off; enable at least one (tflite_fp32 is the reference)")
        return value

    @property
    def enabled_variants(self) -> list[str]:
        """Variant names switched on, in the canonical table order."""
        return [name for name in VariantName.__args__ if self.variants.get(name, False)]


class GateParams(_Section):
    min_accuracy: float = Field(0.9, ge=0.0, le=1.0, description="absolute test accuracy every variant must reach")
    max_accuracy_drop_pts: float = Field(1.0, ge=0.0, le=100.0, description="max drop from the float32 model")
    min_weight_reduction: float | None = Field(3.0, ge=0.0, description=(
        "x fewer weight bytes than tflite_fp32 (constant tensors, so a small model's file overhead does "
        "not hide an honest int8 model); null: off"))
    min_size_reduction: float | None = Field(None, ge=0.0, description="x smaller file than tflite_fp32; null: off")
    max_host_latency_ms: float = Field(20.0, gt=0.0, description="host p95 latency, single stream")


class EvaluateParams(_Section):
    latency_warmup_runs: int = Field(20, ge=0)
    latency_runs: int = Field(200, ge=5)
    gates: GateParams = GateParams()
    recommend_by: RecommendBy = "gzip_size"


class MlflowParams(_Section):
    tracking_uri: str = Field("sqlite:///mlruns.db", description="MLflow store (MLFLOW_TRACKING_URI overrides)")
    experiment: str = Field("edgeloop", min_length=1)
    registered_model: str = Field("edgeloop-digits", min_length=1, pattern=r"^[A-Za-z0-9_.\-]+$")
    hardware_targets: list[str] = Field(default_factory=list)


class RetrainParams(_Section):
    labelled_dir: Path = Path("data/labelled")  # newly labelled device samples (.npz with x, y), optional
    labelled_holdout_fraction: float = Field(0.3, gt=0.0, lt=1.0, description=(  # the rest joins the training split
        "share of the labelled samples (stable hash of the sample id) held out to score challenger and champion"))
    max_frozen_drop_pts: float = Field(1.0, ge=0.0, le=100.0, description=(
        "the approval gate flags (red) a challenger losing more than this on the champion's frozen test set"))
    approval_timeout_s: int = Field(86_400, ge=1, le=30 * 86_400)


StatTest = Literal["wasserstein", "psi", "ks", "jensenshannon", "kl_div", "hellinger", "anderson",
                   "cramer_von_mises", "empirical_mmd", "energy_distance", "chisquare", "z", "fisher_exact", "TVD"]
P_VALUE_TESTS = ("ks", "anderson", "cramer_von_mises", "empirical_mmd", "chisquare", "z", "fisher_exact")


class ColumnTest(_Section):
    """Evidently's statistical test for one column; p-value tests drift below the threshold, distances above."""

    method: StatTest
    threshold: float = Field(gt=0.0)


class DriftParams(_Section):
    """The drift check (``flows/drift_check.py``, :mod:`tasks.monitoring`): data, tests and trigger policy."""

    collected_dir: Path = Field(Path("data/collected"), description="device uploads; windows/, quarantine/ inside")
    reference: str = Field("champion", min_length=1, description=(
        "what a window is compared with: champion (its logged drift reference) or a reference .npz path"))
    reference_rows: int = Field(2000, ge=100, description="training samples in a model's drift reference")
    min_samples: int = Field(50, ge=1, description="a smaller window gets no verdict")
    max_rows: int = Field(10_000, ge=1000, description="a larger window is sampled (uniformly) for the tests")
    min_mean_confidence: float = Field(0.85, gt=0.0, le=1.0, description="mean confidence below this: drift")
    max_latency_p95_ms: float = Field(200.0, gt=0.0, description="device p95 latency above this: drift")
    feature_test: ColumnTest = Field(ColumnTest(method="wasserstein", threshold=0.1), description="other columns")
    column_tests: dict[str, ColumnTest] = Field(default_factory=dict, description="feature column -> its own test")
    drift_share: float = Field(0.5, gt=0.0, le=1.0, description="dataset drift: at least this share drifted")
    prediction_test: ColumnTest = Field(ColumnTest(method="jensenshannon", threshold=0.1), description="predictions")
    consecutive_windows: int = Field(2, ge=1, le=12, description="fire after this many drifted windows in a row ...")
    cooldown_h: float = Field(24.0, ge=0.0, description="... and this long since the last retrain started")
    state_variable: str = Field("edgeloop-drift-state", pattern=r"^[a-z0-9_\-]{1,255}$", description="Prefect variable")
    experiment: str = Field("edgeloop-drift", min_length=1, description="MLflow experiment: one run per check")
    metrics_file: Path = Field(Path("reports/drift/drift.prom"), description="headline figures, Prometheus text")

    @field_validator("column_tests")
    @classmethod
    def _column_names(cls, value: dict[str, ColumnTest]) -> dict[str, ColumnTest]:
        for name in value:
            if not name or not name.replace("_", "").isalnum():
                raise ValueError(f"column_tests: {name!r} is not a feature column name (see edge.features)")
        return value


Platforms = Annotated[list[Literal["linux/amd64", "linux/arm64", "linux/arm/v7"]], Field(min_length=1, description=(
    "image platforms to package for (one image each; arm64 and armv7 are checked under qemu emulation)"))]


class PackageParams(_Section):
    """Container images of a registered model version (``edgeloop package``, tasks/packaging/package.py)."""

    registry: str = Field("127.0.0.1:5050", pattern=r"^[A-Za-z0-9.\-]+(:[0-9]{1,5})?$")  # EDGELOOP_REGISTRY overrides
    repository: str = Field("edgeloop/edge", pattern=r"^[a-z0-9]+([._\-/][a-z0-9]+)*$")
    base_image: str | None = None  # null: python:3.11-slim if the engine has or pulls it, else `make base-images`
    platforms: Platforms = Field(default_factory=lambda: ["linux/amd64", "linux/arm64", "linux/arm/v7"])
    signing_key: Path = Path("keys/control-plane.key")  # private Ed25519 key (PEM) that signs the bundle
    public_keys: Path = Path("keys")                     # .pub file or folder of them the image trusts
    large_variant: VariantName | None = None             # the cascade's second stage, from the same run
    check_device: str = "industrial-256mb"  # devices.yaml entry whose cpus/memory the checked container gets
    max_image_mb: float = Field(150.0, gt=0.0)
    max_start_s: float = Field(5.0, gt=0.0)
    start_attempts: int = Field(3, ge=1, le=10)  # starts measured while over max_start_s; the fastest is gated
    emulated_start_timeout_s: float = Field(180.0, gt=0.0)  # arm64 under qemu: ready within this (not a gate)
    partial_release: bool = False  # push the images that passed when another platform cannot be built or fails

    @field_validator("platforms")
    @classmethod
    def _distinct(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("platforms lists a platform twice")
        return value


DeviceNames = Annotated[list[str], Field(description=(
    "devices (devices.yaml names) to benchmark each candidate on through their runners; empty: all"))]


class BenchmarkParams(_Section):
    """On-device benchmarks of every candidate variant (``edgeloop benchmark``, tasks/benchmark/)."""

    devices: DeviceNames = Field(default_factory=list)
    iterations: int = Field(100, ge=1, le=100_000)
    warmup: int = Field(10, ge=0, le=10_000)
    eval_samples: int = Field(200, ge=1)  # first N test samples: accuracy measured on the device
    rates: list[Annotated[float, Field(gt=0.0)]] = Field(default_factory=list)  # rate sweep, inferences/s
    rate_seconds: float = Field(2.0, gt=0.0, le=600.0)
    timeout_s: float = Field(900.0, gt=0.0)  # per device, all variants
    retries: int = Field(1, ge=0, le=10)     # unreachable device or runner failure: tries again this often
    retry_delay_s: float = Field(5.0, ge=0.0)
    parallel: int = Field(4, ge=1, le=256)   # devices benchmarked at once
    max_rss_fraction: float = Field(0.5, gt=0.0, le=1.0)  # device gate: peak RSS within this share of its RAM
    images: dict[str, str] = Field(default_factory=dict)  # docker runner: platform -> image (default: newest packaged)
    ssh_key: Path | None = None       # ssh runner: private key (default: ~/.ssh's keys)
    known_hosts: Path | None = None   # ssh runner: host keys to verify against (default: ~/.ssh/known_hosts)
    serve_address: str = "127.0.0.1"  # prefect runner: where devices fetch the models from this host

    @field_validator("devices")
    @classmethod
    def _distinct_devices(cls, value: list[str]) -> list[str]:
        if len(set(value)) != len(value):
            raise ValueError("devices lists a device twice")
        return value


class RolloutParams(_Section):
    """Canary rollout over MQTT (``flows/rollout.py``, :mod:`tasks.rollout`): cohorts, health, timings."""

    broker: str = Field("127.0.0.1:1883", pattern=r"^[A-Za-z0-9.\-]+:[0-9]{1,5}$",
                        description="MQTT broker HOST:PORT (EDGELOOP_BROKER overrides)")
    fleet_file: Path = Field(Path("fleet.yaml"), description="fleet file naming the groups' devices")
    credentials_dir: Path = Field(Path(".secrets/mqtt"), description="broker password/ACL files, control-plane login")
    broker_tls: bool = Field(False, description="the broker is mutual TLS: fleet-CA certificates are the logins")
    fleet_ca_dir: Path = Field(Path(".secrets/fleet-ca"), description="the fleet CA (edgeloop fleet ca init), 0700")
    ingest_url: str | None = Field(None, pattern=r"^https://", description="where enrolled devices upload samples")
    group: str = Field("default", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", description="device group")
    stages: list[float] = Field(default_factory=lambda: [5.0, 25.0, 100.0], description="cohort % per stage, to 100")
    stage_window_s: float = Field(600.0, ge=0.0, description="health watched this long after a stage's devices acked")
    ack_timeout_s: float = Field(300.0, gt=0.0, description="devices silent this long are reported by name")
    max_missing_fraction: float = Field(0.0, ge=0.0, le=1.0, description="silent or failed share per stage, at most")
    jitter_s: float = Field(30.0, ge=0.0, le=3600.0, description="devices spread their fetches over this long")
    baseline_window_s: float = Field(600.0, gt=0.0, description="the previous version's telemetry this recent")
    max_error_rate_increase: float = Field(0.02, ge=0.0, le=1.0, description="absolute, over the previous version's")
    max_p95_ratio: float = Field(1.5, gt=1.0, description="p95 latency at most this many times the previous version's")
    min_p95_increase_ms: float = Field(5.0, ge=0.0, description="... unless it rose less (sub-ms noise is no slowdown)")
    max_confidence_drop: float = Field(0.05, ge=0.0, le=1.0, description="mean confidence at most this much lower")
    bundle_dir: Path = Field(Path("reports/rollout/bundles"), description="where the signed bundles are exported")
    bundle_base_url: str | None = Field(None, description="URL devices fetch bundle_dir's files from; null: file://")

    @field_validator("stages")
    @classmethod
    def _ascending_to_all(cls, value: list[float]) -> list[float]:
        if not value or any(not 0 < stage <= 100 for stage in value) or value != sorted(set(value)):
            raise ValueError("stages must be ascending, distinct percentages in (0, 100], e.g. [5, 25, 100]")
        if value[-1] != 100:
            raise ValueError("the last stage must be 100 (the whole group)")
        return value


class Params(_Section):
    """All pipeline parameters; see ``params.yaml`` for the documented defaults."""

    seed: Seed = 42
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    quantize: QuantizeParams = QuantizeParams()
    prune: PruneParams = PruneParams()
    cluster: ClusterParams = ClusterParams()
    convert: ConvertParams = ConvertParams()
    evaluate: EvaluateParams = EvaluateParams()
    mlflow: MlflowParams = MlflowParams()
    retrain: RetrainParams = RetrainParams()
    drift: DriftParams = DriftParams()
    package: PackageParams = PackageParams()
    benchmark: BenchmarkParams = BenchmarkParams()
    rollout: RolloutParams = RolloutParams()

    def params_hash(self) -> str:
        """sha256 of the parameters that shape a model file (:data:`MODEL_SHAPING_SECTIONS`, the convert stage's
        DVC params), recorded in every sidecar; output paths are not parameters (same model, same hash anywhere)."""
        shaping = self.model_dump(mode="json", include=set(MODEL_SHAPING_SECTIONS))
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()

    def flat(self) -> dict[str, str]:
        """Parameters flattened to ``section.key`` strings, as logged to MLflow."""
        return flatten(self.model_dump(mode="json"))


def parse_params(raw: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a parsed mapping into :class:`Params`, raising :class:`ConfigError` on problems."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None


# The environment's overrides, read once with params.yaml (load_params): a variable that is set and not empty
# wins over params.yaml; a run's own parameters (the rollout plan) win over it.
ENVIRONMENT = {"MLFLOW_TRACKING_URI": ("mlflow", "tracking_uri"), "EDGELOOP_REGISTRY": ("package", "registry"),
               "EDGELOOP_SIGNING_KEY": ("package", "signing_key"), "EDGELOOP_TRUSTED_KEYS": ("package", "public_keys"),
               "EDGELOOP_BROKER": ("rollout", "broker"), "EDGELOOP_DATA_SYNC": ("data", "sync"),
               "EDGELOOP_MAX_START_S": ("package", "max_start_s")}  # a slow or busy packaging host


def apply_environment(params: Params, environ: Mapping[str, str] = os.environ) -> Params:
    """``params`` with the :data:`ENVIRONMENT` variables set in ``environ`` over their fields, validated again."""
    found = {variable: environ[variable] for variable in ENVIRONMENT if environ.get(variable)}
    raw = params.model_dump()
    for variable, value in found.items():
        raw[ENVIRONMENT[variable][0]][ENVIRONMENT[variable][1]] = value
    try:
        return Params.model_validate(raw) if found else params
    except ValidationError as error:
        names = {".".join(key): f"{variable} ({'.'.join(key)})" for variable, key in ENVIRONMENT.items()}
        wrong = [v for v in found if any(e["loc"][:2] == ENVIRONMENT[v] for e in error.errors())] or list(found)
        raise ConfigError(format_validation_error(error, f"the environment ({', '.join(wrong)})", names)) from None


def load_params(path: Path | str = PARAMS_FILE) -> Params:
    """Load and validate ``params.yaml``, with the environment's overrides (:data:`ENVIRONMENT`) applied."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"parameter file {path} not found; run from the repository root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    return apply_environment(parse_params(raw, str(path)))
