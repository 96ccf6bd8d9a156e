"""The one typed parameter model of the flows, rendered by the Prefect UI as the Run form.

Every field's type, bounds, choices and description come from :mod:`tasks.config` (the shared
annotated types), so nothing is written twice; device names are choices read from ``devices.yaml``.
A run's overrides of a whole section (the rollout plan, the drift check's settings) are models generated
from the section (:func:`overrides_of`): the same fields, bounds and descriptions, each optional.
Defaults are the repository's ``params.yaml`` when the flow module is loaded (at ``prefect deploy`` and
on the worker): a broken ``params.yaml`` or ``devices.yaml`` fails the deploy with the config's message.
The values a run was given are applied on top of ``params.yaml`` and validated by the same config as
the DVC stages.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from copy import copy
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model

from tasks.config import (
    PARAMS_FILE,
    ClusterEnabled,
    Epochs,
    GateParams,
    ModelChoice,
    ModelPath,
    Params,
    Platforms,
    PruneEnabled,
    RecommendBy,
    Seed,
    Strategy,
    TargetSparsities,
    VariantName,
    format_validation_error,
    load_params,
    parse_params,
)
from tasks.contracts import Workspace
from tasks.devices import DEVICES_FILE, load_devices
from tasks.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
PARAMS_PATH = REPO_ROOT / PARAMS_FILE
DEVICES_PATH = REPO_ROOT / DEVICES_FILE
# Where flow runs write data/, models/ and reports/ unless a run names a workspace: not the repository root,
# whose reports/metrics.json and train_metrics.json are git-tracked experiment metrics that only `dvc repro`
# and `dvc exp run` write (a demo or nightly run leaves the checkout clean). Git-ignored.
FLOW_WORKSPACE = REPO_ROOT / "workspace"

# Loaded when the module is (deploy time, worker): errors are the config's own, naming the key.
DeviceName = Literal[tuple(device.name for device in load_devices(DEVICES_PATH).devices)]  # type: ignore[misc]


class TrainingParameters(BaseModel):
    """What a data scientist may change for one run; everything else comes from params.yaml."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: ModelChoice
    model_path: ModelPath = None
    epochs: Epochs
    seed: Seed
    strategy: Strategy
    prune: PruneEnabled
    target_sparsities: TargetSparsities
    cluster: ClusterEnabled
    variants: list[VariantName] = Field(min_length=1, description="variants to build and compare")
    gates: GateParams
    recommend_by: RecommendBy
    devices: list[DeviceName] = Field(default_factory=list, description="devices to report on (empty: all)")
    benchmark_devices: list[DeviceName] = Field(default_factory=list, description=(
        "devices to benchmark every candidate on through their runners (empty: all in devices.yaml)"))
    benchmark: bool = Field(True, description="measure the candidates on the devices before registering")
    platforms: Platforms

    @classmethod
    def from_params(cls, params: Params) -> TrainingParameters:
        return cls(model=params.train.model, model_path=params.train.model_path, epochs=params.train.epochs,
                   seed=params.seed, strategy=params.quantize.strategy, prune=params.prune.enabled,
                   target_sparsities=params.prune.target_sparsities, cluster=params.cluster.enabled,
                   variants=params.convert.enabled_variants,
                   gates=params.evaluate.gates, recommend_by=params.evaluate.recommend_by,
                   benchmark_devices=params.benchmark.devices, platforms=params.package.platforms)

    def apply(self, base: Params) -> Params:
        """``base`` with these values on top, validated (errors name the params.yaml key)."""
        raw = base.model_dump(mode="json")
        raw["seed"] = self.seed
        raw["train"].update(model=self.model, model_path=str(self.model_path) if self.model_path else None,
                            epochs=self.epochs)
        raw["quantize"]["strategy"] = self.strategy
        raw["prune"].update(enabled=self.prune, target_sparsities=self.target_sparsities)
        raw["cluster"]["enabled"] = self.cluster
        raw["convert"]["variants"] = {name: name in self.variants for name in raw["convert"]["variants"]}
        raw["evaluate"].update(gates=self.gates.model_dump(), recommend_by=self.recommend_by)
        raw["package"]["platforms"] = list(self.platforms)
        raw["benchmark"]["devices"] = list(self.benchmark_devices)
        return parse_params(raw, "flow parameters")


def default_parameters(params_path: Path = PARAMS_PATH) -> TrainingParameters:
    """Defaults from the repository's params.yaml; a broken file raises its ConfigError (never code defaults)."""
    return TrainingParameters.from_params(load_params(params_path))


# The Run form's defaults: params.yaml as it is when the flow module is loaded (deploy time, worker).
DEFAULT_PARAMETERS = default_parameters()


def resolve(parameters: TrainingParameters, workspace: str | None = None,
            params_path: Path = PARAMS_PATH) -> tuple[Params, Workspace]:
    """The effective config and workspace of a flow run: params.yaml + run parameters.

    Also checks what the schema cannot, before any work: the model file exists.
    """
    if parameters.model == "keras_file" and parameters.model_path and not Path(parameters.model_path).exists():
        raise ConfigError(f"params.model_path: {parameters.model_path} does not exist")
    return parameters.apply(load_params(params_path)), Workspace(Path(workspace) if workspace else FLOW_WORKSPACE)


def overrides(parameters: TrainingParameters) -> dict[str, object]:
    """The run parameters that differ from params.yaml, as recorded in MLflow."""
    defaults = DEFAULT_PARAMETERS.model_dump(mode="json")
    return {k: v for k, v in parameters.model_dump(mode="json").items() if defaults.get(k) != v}


Section = TypeVar("Section", bound=BaseModel)


def overrides_of(section: type[BaseModel], name: str, exclude: Iterable[str] = (), module: str = __name__
                 ) -> type[BaseModel]:
    """A model of ``section``'s fields, each optional (default None: keep the config's value), for a run's overrides.

    Annotations, bounds, choices and descriptions are the section's own ``model_fields``, so nothing is
    written twice; what cross-checks the fields (validators) runs when the override is applied
    (:func:`apply_override`). ``exclude``: fields a run must not change.
    """
    fields: dict[str, Any] = {}
    for key, field in section.model_fields.items():
        if key not in exclude:
            optional = copy(field)
            optional.default, optional.default_factory = None, None
            fields[key] = (field.annotation | None, optional)
    return create_model(name, __config__=ConfigDict(extra="forbid", protected_namespaces=()),
                        __doc__=f"What a run may change of {section.__name__} (unset: its value in params.yaml).",
                        __module__=module, **fields)


def apply_override(settings: Section, override: BaseModel | Mapping[str, Any] | None, source: str) -> Section:
    """``settings`` with the override's set (not None) values over them, validated again by the section's model.

    Errors are the config's own, naming the key, the value and what is allowed (``source`` says whose values).
    """
    items = override.__dict__.items() if isinstance(override, BaseModel) else (override or {}).items()
    changes = {key: value for key, value in items if value is not None}
    if not changes:
        return settings
    try:
        return type(settings).model_validate({**settings.model_dump(), **changes})
    except ValidationError as error:
        raise ConfigError(format_validation_error(error, source)) from None
