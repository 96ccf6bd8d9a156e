"""The ``register`` stage: record the run in MLflow, then register the recommended variant.

Every candidate is recorded: a run whose variants all failed the gates is logged as a FAILED run
with its params, metrics and reports (and never registered), so a reviewer can see why. A passing run
logs the recommended variant as an MLflow pyfunc model (``tasks/registry/edge_pyfunc.py``: the edge
runtime, no TensorFlow) and registers it with the alias ``candidate``. Registration is all-or-nothing:
a model version whose tags or alias cannot be set is deleted again. Aliases only, never stages.

Before the version is created, the run also gets what the version is judged by later: its drift
reference (training samples through the devices' feature function, with the variant's outputs) and
its frozen test set (the test split as it was, md5 tagged on the version). When either cannot be
built or logged the stage fails and nothing is registered.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

from edge.errors import EdgeError
from edge.runtime import EdgeModel
from edge.sidecar import read_sidecar, sidecar_path
from tasks.config import DriftParams, MlflowParams, Params
from tasks.contracts import (
    BenchmarkSummary,
    Evaluation,
    Registration,
    TrainSummary,
    Workspace,
    clear_stage_outputs,
    load_arrays,
    read_benchmark,
    read_evaluation,
    read_train_summary,
    write_registration,
)
from tasks.devices import DEVICES_FILE, load_devices
from tasks.entrypoint import run_stage, stage_arguments
from tasks.errors import EdgeloopError, GateFailure, ServiceUnavailable, StageError
from tasks.lineage import file_md5
from tasks.monitoring.reference import REFERENCE_ARTIFACT, build_reference, write_reference
from tasks.registry.device_choice import DeviceChoice, choice_tags, choices_markdown, choose_per_device
from tasks.registry.promotion import FROZEN_TEST_SET_ARTIFACT, FROZEN_TEST_SET_INFO, FROZEN_TEST_SET_TAG
from tasks.registry.tracking import RunRecord, configure, no_answer, pipeline_run
from tasks.variants import VARIANTS
from tasks.workspace import require

log = logging.getLogger(__name__)
CANDIDATE_ALIAS = "candidate"
PYFUNC_FILE = Path(__file__).with_name("edge_pyfunc.py")
EDGE_PACKAGE = Path(__file__).resolve().parents[2] / "edge"
RUNTIME_DISTRIBUTIONS = {"tflite": "ai-edge-litert", "onnx": "onnxruntime"}


def version_tags(params: Params, row_variant: str, sidecar: dict[str, Any], evaluation: Evaluation) -> dict[str, str]:
    row = evaluation.row(row_variant)
    variant = VARIANTS[row_variant]
    return {
        "variant": variant.name, "runtime": variant.runtime, "precision": variant.precision,
        "method": sidecar.get("method", ""), "data_version": sidecar["data_version"],
        "git_commit": sidecar["git_commit"], "params_hash": sidecar["params_hash"], "sha256": sidecar["sha256"],
        "quantize.strategy": params.quantize.strategy, "sparsity": f"{sidecar.get('sparsity', 0.0):.3f}",
        "hardware_targets": ",".join(params.mlflow.hardware_targets),
        "test_accuracy": f"{row.accuracy:.4f}", "accuracy_drop_pts": f"{row.accuracy_drop_pts:.3f}",
        "size_bytes": str(row.size_bytes), "zoo_model": params.train.model,
    }


INPUT_EXAMPLE_ROWS = 8


def log_variant_model(workspace: Workspace, variant: str, summary: TrainSummary) -> str:
    """Log ``variant`` (file + sidecar + the edge package) as a pyfunc model; return its model URI.

    The first test rows go with it as the input example: bundles for devices carry them as the
    health-check sample (``tasks/registry/bundle.py``).
    """
    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    model_file = workspace.variant_file(variant)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, *summary.input_shape))]),  # unnamed: a JSON list is
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(summary.labels)))]))  # cast to float32 when served
    input_example = load_arrays(workspace.split_file("test"), "prepare")["x"][:INPUT_EXAMPLE_ROWS]
    requirements = [f"{name}=={metadata.version(name)}"
                    for name in ("numpy", RUNTIME_DISTRIBUTIONS[VARIANTS[variant].runtime])]
    with tempfile.TemporaryDirectory(prefix="edgeloop-pyfunc-") as scratch:
        folder = Path(scratch) / variant
        folder.mkdir()
        for path in (model_file, sidecar_path(model_file)):
            shutil.copy2(path, folder / path.name)
        info = mlflow.pyfunc.log_model(name=variant, python_model=str(PYFUNC_FILE), artifacts={"variant": str(folder)},
                                       code_paths=[str(EDGE_PACKAGE)], signature=signature,
                                       input_example=input_example.astype(np.float32),
                                       pip_requirements=requirements)
    return info.model_uri


def log_drift_reference(drift: DriftParams, seed: int, workspace: Workspace, variant: str) -> None:
    """Log ``variant``'s drift reference (seeded training samples, their features, its outputs) to the active run."""
    import mlflow
    import numpy as np

    x_train = np.asarray(load_arrays(workspace.split_file("train"), "prepare")["x"], np.float32)
    probabilities = EdgeModel.load(workspace.variant_file(variant)).predict(x_train)
    reference = build_reference(x_train, probabilities, max_rows=drift.reference_rows, seed=seed)
    folder, _, file_name = REFERENCE_ARTIFACT.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="edgeloop-reference-") as scratch:
        write_reference(Path(scratch) / file_name, reference)
        mlflow.log_artifact(str(Path(scratch) / file_name), folder)


def log_frozen_test_set(workspace: Workspace, labels: list[str], data_version: str) -> str:
    """Log the test split as the version's frozen test set (file + info) to the active run; return its md5."""
    import mlflow

    folder, _, file_name = FROZEN_TEST_SET_ARTIFACT.rpartition("/")
    with tempfile.TemporaryDirectory(prefix="edgeloop-frozen-") as scratch:
        frozen = Path(scratch) / file_name  # a copy: the md5 is of exactly the bytes logged
        shutil.copyfile(workspace.split_file("test"), frozen)
        md5 = file_md5(frozen)
        rows = len(load_arrays(frozen, "prepare")["y"])
        mlflow.log_artifact(str(frozen), folder)
    mlflow.log_dict({"md5": md5, "data_version": data_version, "labels": labels, "rows": rows},
                    FROZEN_TEST_SET_INFO)
    return md5


def log_version_evidence(drift: DriftParams, seed: int, workspace: Workspace, variant: str, summary: TrainSummary,
                         data_version: str) -> dict[str, str]:
    """Drift reference and frozen test set into the active run; the model version tags that point at them.

    Runs before the version exists, so a failure here leaves no half registration (the run ends FAILED).
    """
    require(workspace.split_file("test"), "prepare")  # a clear "run prepare" error before any upload
    try:
        log_drift_reference(drift, seed, workspace, variant)
        md5 = log_frozen_test_set(workspace, summary.labels, data_version)
    except (EdgeloopError, EdgeError):
        raise
    except Exception as error:  # disk, numpy or MLflow errors: say which step failed; retry only a silent server
        kind = ServiceUnavailable if no_answer(error) else StageError
        raise kind(f"the drift reference or frozen test set of {variant} could not be written or logged "
                   f"({type(error).__name__}: {error}); nothing was registered, run the register stage again"
                   ) from error
    return {FROZEN_TEST_SET_TAG: md5}


def register_candidate(settings: MlflowParams, run: RunRecord, model_uri: str, variant: str, tags: dict[str, str]
                       ) -> str:
    """Create a model version from ``model_uri`` and point ``candidate`` at it (or leave no version)."""
    import mlflow

    client = mlflow.MlflowClient()
    name = settings.registered_model
    if not client.search_registered_models(filter_string=f"name = '{name}'"):
        client.create_registered_model(name, description="edgeloop edge model; aliases: candidate, champion")
    version = mlflow.register_model(model_uri, name, tags=tags)
    try:
        client.update_model_version(name, version.version, description=f"{variant} from run {run.run_id}")
        client.set_registered_model_alias(name, CANDIDATE_ALIAS, version.version)
    except Exception as error:  # whatever failed, a version without its alias must not stay behind
        failed = (f"version {version.version} of {name} could not be given its description and the alias "
                  f"{CANDIDATE_ALIAS!r} ({type(error).__name__}: {error})")
        kind = ServiceUnavailable if no_answer(error) else StageError
        try:
            client.delete_model_version(name, version.version)
        except Exception as cleanup:
            raise kind(f"{failed}, nor be deleted again ({type(cleanup).__name__}: {cleanup}); delete it in "
                       "MLflow, then run the register stage again") from error
        raise kind(f"{failed}; it was deleted again and nothing is registered: run the register stage again"
                   ) from error
    return str(version.version)


def run_lineage(workspace: Workspace, evaluation: Evaluation) -> dict[str, Any]:
    """The lineage in the sidecars (shared by every variant of a run); empty when no variant was built."""
    built = [row.variant for row in evaluation.rows if row.status == "ok"]
    preferred = evaluation.recommended or (built[0] if built else None)
    return read_sidecar(workspace.variant_file(preferred)) if preferred else {}


def fresh_benchmark(workspace: Workspace) -> BenchmarkSummary | None:
    """The benchmark stage's summary when it ran after this evaluation (a stale one describes another run)."""
    path, evaluated = workspace.benchmark_file, workspace.evaluation_file
    if not path.is_file() or (evaluated.is_file() and path.stat().st_mtime < evaluated.stat().st_mtime):
        return None
    return read_benchmark(workspace)


def log_device_choices(choices: list[DeviceChoice]) -> None:
    """The release's variant per device class, as the run's ``release/`` artifacts (JSON and a table)."""
    import mlflow

    mlflow.log_dict({"device_choices": [choice.as_dict() for choice in choices]}, "release/device_choices.json")
    mlflow.log_text(choices_markdown(choices) + "\n", "release/device_choices.md")


def class_model_tags(workspace: Workspace, choices: list[DeviceChoice], summary: TrainSummary,
                     logged: dict[str, str]) -> dict[str, str]:
    """``device.<class>.model_uri``: each class's variant as a pyfunc model of the run, logged once per variant
    (``logged``: those already logged, variant -> model URI), so ``mlflow.pyfunc.load_model`` serves what the
    class runs."""
    uris = dict(logged)
    for choice in choices:
        if choice.variant is not None and choice.variant not in uris:
            uris[choice.variant] = log_variant_model(workspace, choice.variant, summary)
    return {f"device.{choice.device}.model_uri": uris[choice.variant] for choice in choices if choice.variant}


def register(params: Params, workspace: Workspace, evaluation: Evaluation, summary: TrainSummary,
             extra_tags: dict[str, str] | None = None, benchmark: BenchmarkSummary | None = None,
             devices_path: Path = DEVICES_FILE) -> Registration:
    """Record the run; register its recommended variant, or end the run FAILED when the gates rejected all.

    ``extra_tags`` go on the MLflow run (the Prefect flow run id, the trigger and the parameter overrides);
    ``benchmark`` (the on-device figures) adds device metrics to the run. The version carries the variant of
    every device class of ``devices_path`` and the rule that chose it (:mod:`tasks.registry.device_choice`)
    as tags, and the run the table behind them.
    """
    configure(params.mlflow)
    clear_stage_outputs(workspace, "register")  # a stale record must never describe this run
    lineage = run_lineage(workspace, evaluation)
    with pipeline_run(params, workspace, evaluation, summary, lineage, extra_tags, benchmark) as run:
        if evaluation.recommended is None:
            import mlflow

            mlflow.set_tag("edgeloop.outcome", "rejected by the quality gates")
            raise GateFailure(evaluation.failure)  # ends the MLflow run FAILED: lineage without registration
        variant = evaluation.recommended
        evidence_tags = log_version_evidence(params.drift, params.seed, workspace, variant, summary,
                                             lineage["data_version"])
        model_uri = log_variant_model(workspace, variant, summary)
        choices = choose_per_device(evaluation, load_devices(devices_path), benchmark)
        log_device_choices(choices)
        class_models = class_model_tags(workspace, choices, summary, {variant: model_uri})
        tags = version_tags(params, variant, lineage, evaluation) | choice_tags(choices) | class_models | evidence_tags
        version = register_candidate(params.mlflow, run, model_uri, variant, tags)
    registration = Registration(run_id=run.run_id, experiment_id=run.experiment_id, tracking_uri=run.tracking_uri,
                                registered_model=params.mlflow.registered_model, version=version,
                                alias=CANDIDATE_ALIAS, variant=variant, data_version=lineage["data_version"],
                                model_uri=model_uri)
    write_registration(workspace, registration)
    log.info("registered %s version %s (%s) as %r", registration.registered_model, version, variant, CANDIDATE_ALIAS)
    return registration


def main(argv: list[str] | None = None) -> int:
    parser = stage_arguments(argparse.ArgumentParser(
        prog="edgeloop register", description="register stage: MLflow run + candidate model version"))
    args = parser.parse_args(argv)

    def stage(params: Params, workspace: Workspace) -> None:
        registration = register(params, workspace, read_evaluation(workspace), read_train_summary(workspace),
                                benchmark=fresh_benchmark(workspace))
        print(registration.model_dump_json(indent=2))

    return run_stage(args, stage)


if __name__ == "__main__":
    raise SystemExit(main())
