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

from dataclasses import asdict, dataclass
from typing import Literal

from tasks.contracts import BenchmarkSummary, Evaluation
from tasks.devices import DeviceInventory
from tasks.evaluation.gates import recommend

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

    def as_dict(self) -> dict:
        return asdict(self)


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
                row.p95_ms if row else None, row.accuracy if row else None, outcome.emulated))
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
    """Model version tags: each class's variant (``none``: nothing for it) and the rule that chose it."""
    tags = {}
    for choice in choices:
        tags[f"device.{choice.device}.variant"] = choice.variant or "none"
        tags[f"device.{choice.device}.rule"] = choice.rule
    return tags


def choices_markdown(choices: list[DeviceChoice]) -> str:
    """The per-class table the training summary and the approval gate show."""
    lines = ["| device class | variant | chosen by | device p95 ms | device accuracy | why |",
             "|---|---|---|---|---|---|"]
    for choice in choices:
        p95 = "-" if choice.p95_ms is None else f"{choice.p95_ms:.3f}{' (emulated)' if choice.emulated else ''}"
        accuracy = "-" if choice.accuracy is None else f"{choice.accuracy:.4f}"
        lines.append(f"| {choice.device} | {choice.variant or 'none'} | {choice.rule} | {p95} | {accuracy} | "
                     f"{choice.why} |")
    return "\n".join(lines)
