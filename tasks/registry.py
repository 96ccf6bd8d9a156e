"""The ``register`` stage: log the run to MLflow, then register the recommended variant.

Registration is the last step and all-or-nothing: a model version whose tags or ``candidate`` alias
cannot be set is deleted again, so a failed run never leaves a half-registered version. Aliases
only; the deprecated stages are never used.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from edge.sidecar import atomic_write_text, read_sidecar
from tasks.cli import StageError
from tasks.config import Params
from tasks.evaluate import read_evaluation
from tasks.tracking import RunRecord, configure, pipeline_run
from tasks.train import read_summary
from tasks.variants import VARIANTS

log = logging.getLogger(__name__)
CANDIDATE_ALIAS = "candidate"


def version_tags(params: Params, variant: str, sidecar: dict[str, Any], evaluation: dict[str, Any]) -> dict[str, str]:
    row = next(r for r in evaluation["rows"] if r["variant"] == variant)
    return {
        "variant": variant, "runtime": VARIANTS[variant].runtime, "precision": VARIANTS[variant].precision,
        "method": sidecar.get("method", ""), "data_version": sidecar["data_version"],
        "git_commit": sidecar["git_commit"], "params_hash": sidecar["params_hash"], "sha256": sidecar["sha256"],
        "quantize.strategy": params.quantize.strategy, "sparsity": f"{sidecar.get('sparsity', 0.0):.3f}",
        "hardware_targets": ",".join(params.mlflow.hardware_targets),
        "test_accuracy": f"{row['accuracy']:.4f}", "accuracy_drop_pts": f"{row['accuracy_drop_pts']:.3f}",
        "size_bytes": str(row["size_bytes"]), "zoo_model": params.train.model,
    }


def register_candidate(params: Params, run: RunRecord, variant: str, tags: dict[str, str]) -> str:
    """Create a model version from the run's artifact folder of ``variant`` and point ``candidate`` at it."""
    import mlflow

    client = mlflow.MlflowClient()
    name = params.mlflow.registered_model
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="edgeloop edge model; aliases: candidate, champion")
    version = client.create_model_version(name, source=f"{run.artifact_uri}/models/{variant}", run_id=run.run_id,
                                          tags=tags, description=f"{variant} from run {run.run_id}")
    try:
        client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    except Exception:
        client.delete_model_version(name, version.version)
        raise
    return version.version


def register(params: Params, extra_tags: dict[str, str] | None = None) -> dict[str, Any]:
    """Log the pipeline run and register its recommended variant; return what was registered.

    ``extra_tags`` go on the MLflow run (the Prefect flow run id and the parameter overrides).
    """
    configure(params.mlflow)
    evaluation = read_evaluation(Path(params.evaluate.output_dir))
    variant = evaluation["recommended"]
    if variant is None:
        raise StageError("the evaluation recommends no variant (no variant passed the gates); nothing to register")
    model_file = Path(params.convert.output_dir) / VARIANTS[variant].filename()
    sidecar = read_sidecar(model_file)
    summary = read_summary(Path(params.train.output_dir))
    with pipeline_run(params, evaluation, summary, sidecar, extra_tags) as run:
        version = register_candidate(params, run, variant, version_tags(params, variant, sidecar, evaluation))
    record = {"run_id": run.run_id, "experiment_id": run.experiment_id, "tracking_uri": run.tracking_uri,
              "registered_model": params.mlflow.registered_model, "version": version, "alias": CANDIDATE_ALIAS,
              "variant": variant, "data_version": sidecar["data_version"]}
    atomic_write_text(Path(params.mlflow.registration_file), json.dumps(record, indent=2) + "\n")
    log.info("registered %s version %s (%s) as %r", record["registered_model"], version, variant, CANDIDATE_ALIAS)
    return record


def main(argv: list[str] | None = None) -> int:
    from tasks.cli import run_stage

    parser = argparse.ArgumentParser(description="register stage: MLflow run + candidate model version")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    return run_stage(args.params, lambda params: print(json.dumps(register(params), indent=2)))


if __name__ == "__main__":
    # run the importable module, not __main__, so the error classes raised are the ones tasks.cli catches
    from tasks.registry import main as stage_main

    raise SystemExit(stage_main())
