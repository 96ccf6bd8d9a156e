"""The release's variant per device class (tasks/registry/device_choice.py): each rule, in order, says it chose."""

from __future__ import annotations

from tasks.contracts import BenchmarkSummary, DeviceBenchRow, DeviceOutcome, Evaluation, VariantRow
from tasks.devices import load_devices
from tasks.registry.device_choice import choice_tags, choices_markdown, choose_per_device
from tests.conftest import REPO_ROOT

INVENTORY = load_devices(REPO_ROOT / "devices.yaml")
NAMES = [device.name for device in INVENTORY.devices]
PREFERS = {device.name: device.preferred_runtime for device in INVENTORY.devices}


def _row(variant: str, runtime: str, gzip: int, passed: bool = True,
         fits: tuple[str, ...] = tuple(NAMES)) -> VariantRow:
    return VariantRow(variant=variant, status="ok", runtime=runtime, gzip_bytes=gzip, size_bytes=gzip, accuracy=0.98,
                      latency_p95_ms=1.0, gates_passed=passed,
                      devices={name: "fit" if name in fits else "too large" for name in NAMES})


def _evaluation(rows: list[VariantRow]) -> Evaluation:
    passing = sorted((row for row in rows if row.gates_passed), key=lambda row: row.gzip_bytes)
    return Evaluation(recommended=passing[0].variant if passing else None, recommend_by="gzip_size", gates={},
                      rows=rows)


ROWS = [_row("tflite_int8", "tflite", 150), _row("onnx_int8", "onnx", 160), _row("tflite_fp32", "tflite", 600, False)]


def test_without_a_benchmark_each_class_gets_its_preferred_runtime_then_the_overall_pick() -> None:
    choices = {choice.device: choice for choice in choose_per_device(_evaluation(ROWS), INVENTORY, None)}
    assert list(choices) == NAMES  # every class of the inventory, in its order
    for name, choice in choices.items():
        assert choice.rule == "preferred_runtime" and "no benchmark ran" in choice.why
        assert choice.variant == {"tflite": "tflite_int8", "onnx": "onnx_int8"}[PREFERS[name]]
    only_tflite = [ROWS[0], _row("onnx_int8", "onnx", 160, passed=False)]
    onnx_device = next(name for name, runtime in PREFERS.items() if runtime == "onnx")
    fallback = next(c for c in choose_per_device(_evaluation(only_tflite), INVENTORY, None) if c.device == onnx_device)
    assert (fallback.variant, fallback.rule) == ("tflite_int8", "overall") and "no onnx variant" in fallback.why


def test_a_measured_class_gets_its_benchmark_pick_and_a_class_nothing_passes_on_gets_none() -> None:
    measured, failed, blocked = NAMES[0], NAMES[1], NAMES[2]
    rows = [DeviceBenchRow(device=measured, variant="onnx_int8", config="threads=4", runner="docker", status="ok",
                           emulated=True, p95_ms=3.5, accuracy=0.97)]
    benchmark = BenchmarkSummary(recommend_by="gzip_size", eval_samples=100, reference_accuracy=0.98, rows=rows,
                                 devices=[DeviceOutcome(device=measured, runner="docker", status="ok", emulated=True,
                                                        recommended="onnx_int8", recommended_config="threads=4"),
                                          DeviceOutcome(device=failed, runner="ssh", status="error",
                                                        error="connection refused"),
                                          DeviceOutcome(device=blocked, runner="local", status="ok")])
    choices = {choice.device: choice for choice in choose_per_device(_evaluation(ROWS), INVENTORY, benchmark)}
    assert (choices[measured].variant, choices[measured].rule, choices[measured].p95_ms) == ("onnx_int8", "benchmark",
                                                                                             3.5)
    assert choices[measured].emulated and "emulated" in choices[measured].why
    assert choices[failed].rule == "preferred_runtime" and "connection refused" in choices[failed].why
    assert (choices[blocked].variant, choices[blocked].rule) == (None, "none")
    assert "stays on its current version" in choices[blocked].why
    tags = choice_tags(list(choices.values()))
    assert tags[f"device.{measured}.variant"] == "onnx_int8" and tags[f"device.{blocked}.variant"] == "none"
    assert tags[f"device.{failed}.rule"] == "preferred_runtime"
    table = choices_markdown(list(choices.values()))
    assert f"| {measured} | onnx_int8 | threads=4 | benchmark | 3.500 (emulated) | 0.9700 |" in table
    assert choices[measured].options is None and f"device.{measured}.runtime_options" not in tags


def test_a_class_measured_best_outside_its_runtimes_default_gets_that_configuration_in_its_bundle() -> None:
    """The x86 gateway measures LiteRT without XNNPACK, the Jetson ONNX Runtime on TensorRT and CUDA: a winning
    non-default configuration becomes the class's runtime_options (what its bundle asks the device for)."""
    import json

    from edge.store.manifest import RuntimeSettings

    def outcome(device: str, variant: str, config: str) -> tuple[DeviceBenchRow, DeviceOutcome]:
        return (DeviceBenchRow(device=device, variant=variant, config=config, runner="local", status="ok", p95_ms=1.0,
                               accuracy=0.98),
                DeviceOutcome(device=device, runner="local", status="ok", recommended=variant,
                              recommended_config=config))

    picks = [outcome("x86-gateway", "tflite_int8", "no-xnnpack"),
             outcome("jetson-xavier-nx", "onnx_int8", "CUDAExecutionProvider"),
             outcome("rpi4-8gb", "tflite_int8", "default"),
             outcome("industrial-256mb", "onnx_int8", "no-xnnpack")]  # not measured there: no such configuration
    benchmark = BenchmarkSummary(recommend_by="gzip_size", eval_samples=100, reference_accuracy=0.98,
                                 rows=[row for row, _ in picks], devices=[device for _, device in picks])
    choices = {choice.device: choice for choice in choose_per_device(_evaluation(ROWS), INVENTORY, benchmark)}
    assert choices["x86-gateway"].options == {"config": "no-xnnpack", "xnnpack": False}
    assert choices["jetson-xavier-nx"].options == {
        "config": "CUDAExecutionProvider", "onnx_providers": ["CUDAExecutionProvider", "CPUExecutionProvider"]}
    assert choices["rpi4-8gb"].options is None and choices["industrial-256mb"].options is None
    tags = choice_tags(list(choices.values()))
    settings = RuntimeSettings.from_json(tags["device.x86-gateway.runtime_options"])
    assert (settings.config, settings.xnnpack) == ("no-xnnpack", False)
    assert json.loads(tags["device.jetson-xavier-nx.runtime_options"])["onnx_providers"][0] == "CUDAExecutionProvider"
    assert "device.rpi4-8gb.runtime_options" not in tags
    assert "| x86-gateway | tflite_int8 | no-xnnpack | benchmark |" in choices_markdown(list(choices.values()))


def test_a_class_that_nothing_fits_gets_none() -> None:
    small = next(device.name for device in INVENTORY.devices if device.ram_mb <= 256)
    rows = [_row("tflite_int8", "tflite", 150, fits=tuple(n for n in NAMES if n != small))]
    choice = next(c for c in choose_per_device(_evaluation(rows), INVENTORY, None) if c.device == small)
    assert (choice.variant, choice.rule) == (None, "none") and "fits its storage and RAM" in choice.why
