"""Compression benchmark: size ratio and accuracy drop of every variant vs tflite_fp32.

Trains the configured model (digits_cnn, ~151k parameters, on the bundled digits) into a scratch
folder with the task functions the pipeline uses, or with ``--reuse`` reads the last pipeline
run's ``reports/evaluation.json``. Targets: full-integer int8 >= 3.5x smaller at <= 0.5 pts drop;
pruned + int8, gzipped, >= 10x smaller at <= 1 pt drop.

    .venv/bin/python bench/compression.py [--params params.yaml] [--reuse]

The gzip ratio compares gzip sizes on both sides (gzip(tflite_fp32) / gzip(pruned int8)), which is
stricter than comparing with the raw float32 file. Last line: ``name=value ...``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.config import load_params  # noqa: E402
from tasks.variants import REFERENCE_VARIANT  # noqa: E402


def run_pipeline(params_path: Path, workdir: Path) -> tuple[dict, int]:
    """prepare -> train -> convert -> evaluate into ``workdir``; return the evaluation and param count."""
    from tasks.convert import convert_all
    from tasks.data import load_prepared, prepare
    from tasks.evaluate import evaluate
    from tasks.train import train

    base = load_params(params_path)
    overrides = {
        "data": {"output_dir": str(workdir / "data")},
        "train": {"output_dir": str(workdir / "keras"), "metrics_file": str(workdir / "train_metrics.json")},
        "convert": {"output_dir": str(workdir / "variants")},
        "evaluate": {"output_dir": str(workdir / "reports")},
    }
    raw = base.model_dump(mode="json")
    for section, values in overrides.items():
        raw[section].update(values)
    params = type(base).model_validate(raw)
    prepare(params.data, params.seed)
    summary = train(params, load_prepared(Path(params.data.output_dir)))
    convert_all(params, load_prepared(Path(params.data.output_dir)))
    return evaluate(params, params_path.parent / "devices.yaml"), summary["params_count"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--reuse", action="store_true", help="read reports/evaluation.json instead of training")
    args = parser.parse_args()
    if args.reuse:
        evaluation = json.loads(Path("reports/evaluation.json").read_text())
        params_count = json.loads(Path("reports/train_metrics.json").read_text())["params_count"]
    else:
        with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as workdir:
            evaluation, params_count = run_pipeline(args.params.resolve(), Path(workdir))
    rows = {row["variant"]: row for row in evaluation["rows"] if row["status"] == "ok"}
    reference = rows[REFERENCE_VARIANT]
    print(f"model parameters: {params_count}")
    print(f"{'variant':20s} {'size B':>9s} {'ratio':>6s} {'gzip B':>9s} {'gz ratio':>8s} {'acc':>7s} {'drop pts':>8s}")
    for name, row in rows.items():
        print(f"{name:20s} {row['size_bytes']:9d} {reference['size_bytes'] / row['size_bytes']:6.2f} "
              f"{row['gzip_bytes']:9d} {reference['gzip_bytes'] / row['gzip_bytes']:8.2f} "
              f"{row['accuracy']:7.4f} {row['accuracy_drop_pts']:8.2f}")
    int8, pruned = rows["tflite_int8"], rows["tflite_int8_pruned"]
    print(f"int8_size_ratio={reference['size_bytes'] / int8['size_bytes']:.2f} "
          f"int8_acc_drop_pts={int8['accuracy_drop_pts']:.2f} "
          f"pruned_int8_gzip_ratio={reference['gzip_bytes'] / pruned['gzip_bytes']:.2f} "
          f"pruned_int8_acc_drop_pts={pruned['accuracy_drop_pts']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
