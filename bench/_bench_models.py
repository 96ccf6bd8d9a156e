"""Models for the on-device benchmark scripts: ``resnet8`` on 32x32x3 (random weights: timing only)."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def resnet8_files(folder: Path) -> dict[str, Path]:
    """``resnet8`` exported as float32 and full-integer int8 TFLite (representative data: uniform noise)."""
    import numpy as np

    from tasks.model.exporters import tflite_bytes
    from tasks.model.tfsetup import set_seeds
    from tasks.model.zoo import build_model

    set_seeds(0)
    model = build_model("resnet8", (32, 32, 3), 10)
    representative = np.random.default_rng(0).random((64, 32, 32, 3), dtype=np.float32)
    folder.mkdir(parents=True, exist_ok=True)
    files = {"fp32": folder / "resnet8_fp32.tflite", "int8": folder / "resnet8_int8.tflite"}
    files["fp32"].write_bytes(tflite_bytes(model, "fp32"))
    files["int8"].write_bytes(tflite_bytes(model, "int8", representative))
    return files


def edge_bench_p50(models: list[Path], iterations: int, warmup: int, threads: int = 1) -> list[float]:
    """``python -m edge.bench`` on ``models`` (one fresh child each); the steady-state p50 of each, in ms."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "result.json"
        subprocess.run([sys.executable, "-m", "edge.bench", *map(str, models), "--iterations", str(iterations),
                        "--warmup", str(warmup), "--threads", str(threads), "--out", str(out)], check=True,
                       capture_output=True, text=True)
        results = json.loads(out.read_text())["results"]
    return [row["latency"]["p50_ms"] for row in results]
