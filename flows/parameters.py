"""The one typed parameter model of the flows, rendered by the Prefect UI as the Run form.

Its defaults are read from ``params.yaml`` when the flow module is loaded (at ``prefect deploy`` and on
the worker), so the form shows the repository's parameters; the values a run was given are applied
on top of ``params.yaml`` and validated by the same config as the DVC stages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.config import ConfigError, GateParams, Params, VariantName, ZooModel, load_params, parse_params
from tasks.devices import load_devices

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_FILE = REPO_ROOT / "params.yaml"
DEVICES_FILE = REPO_ROOT / "devices.yaml"


class TrainingParameters(BaseModel):
    """What a data scientist may change for one run; everything else comes from params.yaml."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ZooModel = Field(description="model zoo entry, or keras_file to fine-tune model_path")
    model_path: str | None = Field(None, description="keras_file only: .keras, .h5 or SavedModel path")
    epochs: int = Field(ge=1, le=1000, description="float32 baseline training epochs")
    seed: int = Field(ge=0, le=2**31 - 1)
    strategy: Literal["auto", "ptq", "qat", "all"] = Field(description="quantization strategy")
    prune: bool = Field(description="run the pruning search")
    target_sparsities: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(
        min_length=1, description="pruning sparsities to try, each between 0 and 1")
    variants: list[VariantName] = Field(min_length=1, description="variants to build and compare")
    gates: GateParams
    recommend_by: Literal["size", "gzip_size", "latency", "accuracy"]
    devices: list[str] = Field(default_factory=list, description="devices.yaml names to report on (empty: all)")

    @classmethod
    def from_params(cls, params: Params) -> TrainingParameters:
        return cls(model=params.train.model, model_path=str(params.train.model_path or "") or None,
                   epochs=params.train.epochs, seed=params.seed, strategy=params.quantize.strategy,
                   prune=params.prune.enabled, target_sparsities=params.prune.target_sparsities,
                   variants=params.convert.enabled_variants, gates=params.evaluate.gates,
                   recommend_by=params.evaluate.recommend_by)

    def apply(self, base: Params) -> Params:
        """``base`` with these values on top, validated (errors name the params.yaml key)."""
        raw = base.model_dump(mode="json")
        raw["seed"] = self.seed
        raw["train"].update(model=self.model, model_path=self.model_path, epochs=self.epochs)
        raw["quantize"]["strategy"] = self.strategy
        raw["prune"].update(enabled=self.prune, target_sparsities=self.target_sparsities)
        raw["convert"]["variants"] = {name: name in self.variants for name in raw["convert"]["variants"]}
        raw["evaluate"].update(gates=self.gates.model_dump(), recommend_by=self.recommend_by)
        return parse_params(raw, "flow parameters")


def default_parameters() -> TrainingParameters:
    """Defaults from the repository's params.yaml (code defaults when it is absent)."""
    try:
        return TrainingParameters.from_params(load_params(PARAMS_FILE))
    except ConfigError:
        return TrainingParameters.from_params(Params())


# The Run form's defaults: params.yaml as it is when the flow module is loaded (deploy time, worker).
DEFAULT_PARAMETERS = default_parameters()


def with_workspace(params: Params, workspace: str | None) -> Params:
    """Rebase every output path under ``workspace`` (one folder per run, for concurrent runs and tests)."""
    if not workspace:
        return params
    root = Path(workspace)
    raw = params.model_dump(mode="json")
    for section, key in (("data", "output_dir"), ("train", "output_dir"), ("train", "metrics_file"),
                         ("convert", "output_dir"), ("evaluate", "output_dir"), ("mlflow", "registration_file"),
                         ("mlflow", "artifact_root")):
        raw[section][key] = str(root / raw[section][key])
    return parse_params(raw, "flow parameters")


def resolve(parameters: TrainingParameters, workspace: str | None = None, params_file: Path = PARAMS_FILE,
            devices_file: Path = DEVICES_FILE) -> Params:
    """The effective config of a flow run: params.yaml + run parameters (+ workspace).

    Also checks what the schema cannot, before any work: device names exist, a model file exists.
    """
    known = [device.name for device in load_devices(devices_file).devices]
    unknown = [name for name in parameters.devices if name not in known]
    if unknown:
        raise ConfigError(f"params.devices: unknown device(s) {unknown}; devices.yaml has {known}")
    if parameters.model == "keras_file" and parameters.model_path and not Path(parameters.model_path).exists():
        raise ConfigError(f"params.model_path: {parameters.model_path} does not exist")
    return with_workspace(parameters.apply(load_params(params_file)), workspace)


def overrides(parameters: TrainingParameters) -> dict[str, object]:
    """The run parameters that differ from params.yaml, as recorded in MLflow."""
    defaults = DEFAULT_PARAMETERS.model_dump(mode="json")
    return {k: v for k, v in parameters.model_dump(mode="json").items() if defaults.get(k) != v}
