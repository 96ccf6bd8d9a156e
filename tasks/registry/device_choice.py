"""Which variant each device class runs: a release is one registered version with one variant per class.

A device class is an entry of ``devices.yaml`` (every device of the fleet that is that board). Its variant is
chosen by the first rule that applies, and the choice says which one did:

- ``benchmark``: the class was measured on its device (or its honest emulation) and a variant passes every
  device gate there: the benchmark's recommendation for it, with the figures behind it;
- ``none``: it was measured and no variant passes its device gates: the release has nothing for it and the
  class stays on the version it runs (its rollout skips it, with this reason);
- ``preferred_runtime``: not measured (no benchmark ran, its runner failed, or it was left out): the best
  variant in the device's ``preferred_runtime`` that passes the quality gates and fits its storage and RAM;
- ``overall``: not measured and nothing in its preferred runtime qualifies: the overall recommendation,
  when it fits the device; otherwise ``none``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any, Literal

from tasks.contracts import BenchmarkSummary, Evaluation
from tasks.devices import DeviceInventory, DeviceSpec
from tasks.evaluation.gates import recommend
from tasks.variants import VARIANTS

Rule = Literal["benchmark", "none", "preferred_runtime", "overall"]


@dataclass(frozen=True)
class DeviceChoice:
    device: str
    variant: str | None
    rule: Rule
    why: str
    config: str | None = None       # the benchmark configuration measured (threads, delegate, provider)
    p95_ms: float | None = None     # on the device (emulated: not a device timing)
    accuracy: float | None = None   # on the device, on the benchmark's eval subset
    emulated: bool = False
    options: dict[str, Any] | None = None  # the bundle's runtime_options: the measured config when not the default

    def as_dict(self) -> dict:
        return asdict(self)


def runtime_settings(device: DeviceSpec, config: str | None, variant: str) -> dict[str, Any] | None:
    """What a bundle of ``variant`` must ask the device's runtime for to run as it was measured in ``config``
    (``edge.store.manifest.RuntimeSettings``), or None when that is the runtime's default."""
    measured = next((item for item in device.benchmark_configs() if item["name"] == config), None)
    if measured is None or variant not in VARIANTS:
        return None
    if VARIANTS[variant].runtime == "tflite" and not measured["xnnpack"]:
        return {"config": config, "xnnpack": False}
    if VARIANTS[variant].runtime == "onnx" and measured["providers"] != ["CPUExecutionProvider"]:
        return {"config": config, "onnx_providers": list(measured["providers"])}
    return None


def choose_per_device(evaluation: Evaluation, inventory: DeviceInventory,
                      benchmark: BenchmarkSummary | None) -> list[DeviceChoice]:
    """Every device class of ``inventory``, in its order, with its variant and the rule that chose it."""
    outcomes = {outcome.device: outcome for outcome in benchmark.devices} if benchmark else {}
    choices = []
    for device in inventory.devices:
        outcome = outcomes.get(device.name)
        if outcome is not None and outcome.status == "ok":
            if outcome.recommended is None:
                choices.append(DeviceChoice(device.name, None, "none", "measured: no variant passes every device "
                                                                       "gate on it; it stays on its current version"))
                continue
            row = next((row for row in benchmark.rows if row.device == device.name
                        and row.variant == outcome.recommended and row.config == outcome.recommended_config), None)
            choices.append(DeviceChoice(
                device.name, outcome.recommended, "benchmark",
                f"measured on the device{' (emulated)' if outcome.emulated else ''}: the best variant passing "
                f"every device gate by {benchmark.recommend_by}", outcome.recommended_config,
                row.p95_ms if row else None, row.accuracy if row else None, outcome.emulated,
                runtime_settings(device, outcome.recommended_config, outcome.recommended)))
            continue
        unmeasured = ("no benchmark ran" if benchmark is None else "not benchmarked" if outcome is None
                      else f"its benchmark failed ({outcome.error[:120]})")
        fitting = [row for row in evaluation.rows if row.gates_passed and row.devices.get(device.name) == "fit"]
        preferred = recommend([row for row in fitting if row.runtime == device.preferred_runtime],
                              evaluation.recommend_by)
        if preferred is not None:
            choices.append(DeviceChoice(device.name, preferred.variant, "preferred_runtime",
                                        f"{unmeasured}: the best {device.preferred_runtime} variant passing the "
                                        f"quality gates that fits it, by {evaluation.recommend_by}"))
        elif evaluation.recommended is not None and any(row.variant == evaluation.recommended for row in fitting):
            choices.append(DeviceChoice(device.name, evaluation.recommended, "overall",
                                        f"{unmeasured}, and no {device.preferred_runtime} variant qualifies: the "
                                        "overall recommendation"))
        else:
            choices.append(DeviceChoice(device.name, None, "none", f"{unmeasured}, and no variant passing the "
                                                                   "quality gates fits its storage and RAM"))
    return choices


def choice_tags(choices: list[DeviceChoice]) -> dict[str, str]:
    """Model version tags: each class's variant (``none``: nothing for it), the rule that chose it and, when it
    was measured best in a configuration other than its runtime's default, that configuration (JSON)."""
    tags = {}
    for choice in choices:
        tags[f"device.{choice.device}.variant"] = choice.variant or "none"
        tags[f"device.{choice.device}.rule"] = choice.rule
        if choice.options is not None:
            tags[f"device.{choice.device}.runtime_options"] = json.dumps(choice.options, sort_keys=True)
    return tags


def choices_markdown(choices: list[DeviceChoice]) -> str:
    """The per-class table the training summary and the approval gate show."""
    lines = ["| device class | variant | runtime config | chosen by | device p95 ms | device accuracy | why |",
             "|---|---|---|---|---|---|---|"]
    for choice in choices:
        p95 = "-" if choice.p95_ms is None else f"{choice.p95_ms:.3f}{' (emulated)' if choice.emulated else ''}"
        accuracy = "-" if choice.accuracy is None else f"{choice.accuracy:.4f}"
        lines.append(f"| {choice.device} | {choice.variant or 'none'} | {choice.config or '-'} | {choice.rule} | "
                     f"{p95} | {accuracy} | "
                     f"{choice.why} |")
    return "\n".join(lines)
