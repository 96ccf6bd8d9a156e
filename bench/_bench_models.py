"""Models for the on-device benchmark scripts: ``resnet8`` on 32x32x3 (random weights: timing only)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _resnet8():
    """``resnet8`` for 32x32x3, seeded, and its representative data (uniform noise): one model for every file."""
    import numpy as np

    from tasks.model.tfsetup import set_seeds
    from tasks.model.zoo import build_model

    set_seeds(0)
    return build_model("resnet8", (32, 32, 3), 10), np.random.default_rng(0).random((64, 32, 32, 3), dtype=np.float32)


def resnet8_files(folder: Path) -> dict[str, Path]:
    """``resnet8`` exported as float32 and full-integer int8 TFLite."""
    from tasks.model.exporters import tflite_bytes

    model, representative = _resnet8()
    folder.mkdir(parents=True, exist_ok=True)
    files = {"fp32": folder / "resnet8_fp32.tflite", "int8": folder / "resnet8_int8.tflite"}
    files["fp32"].write_bytes(tflite_bytes(model, "fp32"))
    files["int8"].write_bytes(tflite_bytes(model, "int8", representative))
    return files


def resnet8_onnx_files(folder: Path) -> dict[str, Path]:
    """The same ``resnet8`` as ONNX: float32, and int8 QDQ as S8S8 and as U8S8 with reduce_range."""
    from tasks.model.exporters import onnx_bytes, onnx_int8_bytes

    model, representative = _resnet8()
    folder.mkdir(parents=True, exist_ok=True)
    fp32 = onnx_bytes(model, opset=17)
    files = {name: folder / f"resnet8_{name}.onnx" for name in ("fp32", "s8s8", "u8s8_reduce_range")}
    files["fp32"].write_bytes(fp32)
    for scheme in ("s8s8", "u8s8_reduce_range"):
        files[scheme].write_bytes(onnx_int8_bytes(fp32, representative, scheme))
    return files


def cpu_flags(names: tuple[str, ...] = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8")) -> dict[str, int]:
    """Which of the int8-relevant x86 flags this CPU reports (1/0), from /proc/cpuinfo."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return {name: 0 for name in names}
    present = set(line.split(":", 1)[1].split())
    return {name: int(name in present) for name in names}


def edge_bench_p50(models: list[Path], iterations: int, warmup: int, threads: int = 1,
                   extra: tuple[str, ...] = ()) -> list[float]:
    """``python -m edge.bench`` on ``models`` (one fresh child each); the steady-state p50 of each, in ms.
    ``extra``: more edge.bench options (``--no-xnnpack``)."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        subprocess.run([sys.executable, "-m", "edge.bench", *map(str, models), "--iterations", str(iterations),
                        "--warmup", str(warmup), "--threads", str(threads), "--out", str(out), *extra], check=True,
                       capture_output=True, text=True)
        results = json.loads(out.read_text())["results"]
    return [row["latency"]["p50_ms"] for row in results]
