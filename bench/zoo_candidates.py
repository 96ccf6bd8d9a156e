"""Zoo benchmark: every zoo model through the whole pipeline with the default params on the bundled digits.

For each ``train.model`` in the zoo: prepare -> train (the full recipe: PTQ check, QAT when needed,
pruning search, PQAT) -> convert (8 variants) -> evaluate (default gates) -> register, into a scratch
workspace and a scratch SQLite MLflow store: the same task functions ``dvc repro`` runs. Prints the
baseline test accuracy, the recommended variant with its accuracy and weight/file reduction, and
whether a candidate was registered.

    .venv/bin/python bench/zoo_candidates.py [--models resnet8 ds_cnn] [--params params.yaml]

Last line: ``registered=<n>/<models> min_baseline_test_accuracy=<x> <model>_accuracy=<x> ...``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tasks.config import PARAMS_FILE, load_params
from tasks.contracts import Workspace, read_prepared
from tasks.data.prepare import prepare
from tasks.errors import EdgeloopError
from tasks.evaluation.evaluate import evaluate
from tasks.model.convert import convert_all
from tasks.model.train import train
from tasks.model.zoo import ZOO_MODELS
from tasks.registry.register import register


def run_model(model: str, params_path: Path, root: Path) -> dict[str, object]:
    base = load_params(params_path)
    store = base.mlflow.model_copy(update={"tracking_uri": f"sqlite:///{root / model / 'mlflow.db'}"})
    params = base.model_copy(update={"train": base.train.model_copy(update={"model": model}), "mlflow": store})
    workspace = Workspace(root / model)
    started = time.perf_counter()
    prepare(params.data, params.seed, workspace)
    summary = train(params, read_prepared(workspace), workspace)
    evaluation = evaluate(params.evaluate, workspace, convert_all(params, read_prepared(workspace), summary, workspace))
    result: dict[str, object] = {"baseline_test_accuracy": summary.baseline.test_accuracy,
                                 "recommended": evaluation.recommended}
    try:
        registration = register(params, workspace, evaluation, summary)
        result["registered"] = f"v{registration.version}"
    except EdgeloopError as error:
        result["registered"] = f"no: {str(error).splitlines()[0]}"
    if evaluation.recommended:
        row = evaluation.row(evaluation.recommended)
        result.update(accuracy=row.accuracy, weight_reduction=row.weight_reduction, size_reduction=row.size_reduction)
    result["seconds"] = time.perf_counter() - started
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(ZOO_MODELS), choices=ZOO_MODELS)
    parser.add_argument("--params", type=Path, default=PARAMS_FILE)
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(prefix="edgeloop-zoo-") as scratch:
        for model in args.models:
            results[model] = run_model(model, args.params, Path(scratch))
            figures = results[model]
            print(f"{model:18s} baseline test {figures['baseline_test_accuracy']:.4f}  recommended "
                  f"{figures['recommended']} acc {figures.get('accuracy', float('nan')):.4f} weights "
                  f"{figures.get('weight_reduction') or 0:.2f}x file {figures.get('size_reduction') or 0:.2f}x  "
                  f"registered {figures['registered']}  ({figures['seconds']:.0f} s)", flush=True)
    registered = sum(str(r["registered"]).startswith("v") for r in results.values())
    accuracies = " ".join(f"{model}_accuracy={r.get('accuracy', 0.0):.4f}" for model, r in results.items())
    print(f"registered={registered}/{len(results)} "
          f"min_baseline_test_accuracy={min(r['baseline_test_accuracy'] for r in results.values()):.4f} {accuracies}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
