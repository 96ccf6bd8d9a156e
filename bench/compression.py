"""Compression benchmark: size ratio and accuracy drop of every variant vs tflite_fp32.

Trains the configured model (digits_cnn, ~151k parameters, on the bundled digits) into a scratch
folder with the task functions the pipeline uses, or with ``--reuse`` reads the last pipeline
run's ``reports/evaluation.json``. Targets: full-integer int8 >= 3.5x smaller at <= 0.5 pts drop;
pruned + int8, gzipped, >= 10x smaller at <= 1 pt drop; pruned + clustered + int8 (PCQAT), gzipped, >= 15x
smaller at <= 1 pt drop. ``--model resnet8`` runs the same with the zoo's resnet8.

    .venv/bin/python bench/compression.py [--params params.yaml] [--reuse] [--model resnet8]

The gzip ratio compares gzip sizes on both sides (gzip(tflite_fp32) / gzip(pruned int8)), which is
stricter than comparing with the raw float32 file. Last line: ``name=value ...``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from tasks.config import PARAMS_FILE, load_params
from tasks.contracts import Evaluation, Workspace, read_evaluation, read_prepared, read_train_summary
from tasks.data.prepare import prepare
from tasks.devices import DEVICES_FILE
from tasks.evaluation.evaluate import evaluate
from tasks.model.convert import convert_all
from tasks.model.train import train
from tasks.variants import REFERENCE_VARIANT


def run_pipeline(params_path: Path, workspace: Workspace, model: str | None = None) -> tuple[Evaluation, int]:
    """prepare -> train -> convert -> evaluate into ``workspace``; return the evaluation and param count."""
    params = load_params(params_path)
    if model is not None:
        params = params.model_copy(update={"train": params.train.model_copy(update={"model": model})})
    prepare(params.data, params.seed, workspace)
    summary = train(params, read_prepared(workspace), workspace)
    conversions = convert_all(params, read_prepared(workspace), summary, workspace)
    return evaluate(params.evaluate, workspace, conversions, params_path.parent / DEVICES_FILE), summary.params_count


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    parser.add_argument("--reuse", action="store_true", help="read reports/evaluation.json instead of training")
    parser.add_argument("--model", help="a zoo model instead of params.yaml's (e.g. resnet8)")
    args = parser.parse_args()
    if args.reuse:
        evaluation, params_count = read_evaluation(Workspace()), read_train_summary(Workspace()).params_count
    else:
        with tempfile.TemporaryDirectory(prefix="edgeloop-bench-") as workdir:
            evaluation, params_count = run_pipeline(args.params.resolve(), Workspace(Path(workdir)), args.model)
    rows = {row.variant: row.model_dump() for row in evaluation.rows if row.status == "ok"}
    reference = rows[REFERENCE_VARIANT]
    print(f"model parameters: {params_count}")
    print(f"{'variant':28s} {'size B':>9s} {'ratio':>6s} {'gzip B':>9s} {'gz ratio':>8s} {'acc':>7s} {'drop pts':>8s} "
          f"{'sparsity':>8s} {'distinct':>8s}")
    for name, row in rows.items():
        print(f"{name:28s} {row['size_bytes']:9d} {reference['size_bytes'] / row['size_bytes']:6.2f} "
              f"{row['gzip_bytes']:9d} {reference['gzip_bytes'] / row['gzip_bytes']:8.2f} "
              f"{row['accuracy']:7.4f} {row['accuracy_drop_pts']:8.2f} {row['file_sparsity'] or 0:8.3f} "
              f"{row['max_distinct_weights'] or 0:8d}")
    int8, pruned = rows["tflite_int8"], rows["tflite_int8_pruned"]
    clustered = rows.get("tflite_int8_pruned_clustered") or rows.get("tflite_int8_clustered")
    figures = (f"clustered_gzip_ratio={reference['gzip_bytes'] / clustered['gzip_bytes']:.2f} "
               f"clustered_acc_drop_pts={clustered['accuracy_drop_pts']:.2f}" if clustered
               else "clustered_gzip_ratio=none clustered_acc_drop_pts=none")
    print(f"int8_size_ratio={reference['size_bytes'] / int8['size_bytes']:.2f} "
          f"int8_acc_drop_pts={int8['accuracy_drop_pts']:.2f} "
          f"pruned_int8_gzip_ratio={reference['gzip_bytes'] / pruned['gzip_bytes']:.2f} "
          f"pruned_int8_acc_drop_pts={pruned['accuracy_drop_pts']:.2f} {figures}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
