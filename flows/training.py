"""The ``training`` flow (nightly, or Run from the UI): data check -> train -> convert -> evaluate -> benchmark on
devices -> register."""

from __future__ import annotations

import json

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext

from flows import steps
from flows.artifacts import publish_benchmark, publish_gate_failure, publish_images, publish_training
from flows.locking import exclusive_outputs
from flows.parameters import DEFAULT_PARAMETERS, TrainingParameters, overrides, resolve
from tasks.config import Params
from tasks.contracts import BenchmarkSummary, Evaluation, Registration, Workspace


def run_tags(parameters: TrainingParameters, trigger: str) -> dict[str, str]:
    """MLflow run tags tying the run to its Prefect flow run, what started it and the UI overrides."""
    context = FlowRunContext.get()
    flow_run_id = str(context.flow_run.id) if context and context.flow_run else "local"
    return {"prefect.flow_run_id": flow_run_id, "prefect.overrides": json.dumps(overrides(parameters)),
            "edgeloop.trigger": trigger}


def build_candidate(config: Params, workspace: Workspace, parameters: TrainingParameters,
                    trigger: str = "schedule or manual") -> tuple[Evaluation, Registration, BenchmarkSummary | None]:
    """The shared path of the training and retrain flows; returns (evaluation, registration, benchmark)."""
    # ---- services and data ----------------------------------------------------------------------
    steps.check_services(config)
    data = steps.data_version(config)
    steps.prepare(config, workspace)
    # ---- model: train, convert, evaluate ---------------------------------------------------------
    summary = steps.train_models(config, workspace)
    conversions = steps.convert_variants(config, workspace, summary)
    evaluation = steps.evaluate_variants(config, workspace, conversions)
    benchmark = None
    if evaluation.recommended is None:  # show why in the UI; register then records the FAILED run and fails
        publish_gate_failure(evaluation)
    elif parameters.benchmark:  # ---- on the target devices, through their runners ---------------
        benchmark = steps.benchmark_on_devices(config, workspace, evaluation)
        publish_benchmark(benchmark, workspace)
    # ---- registry: last, so a failed run registers nothing ----------------------------------------
    registration = steps.register_candidate(config, workspace, evaluation, summary,
                                            run_tags(parameters, trigger) | data["tags"], benchmark)
    return evaluation, registration, benchmark


@flow(name="training", log_prints=True, persist_result=True)
def training(params: TrainingParameters = DEFAULT_PARAMETERS, workspace: str | None = None,
             package: bool = False) -> Registration:
    """Build, measure and register a candidate from params.yaml plus the given parameters.

    Args:
        params: what to change for this run (defaults: params.yaml).
        workspace: folder for this run's outputs (default: the repository's workspace/ folder).
        package: also build, check and push the candidate's edge images (needs a Docker engine and the
            image registry of params.yaml's package section).
    """
    config, run_workspace = resolve(params, workspace)
    with exclusive_outputs(run_workspace):
        evaluation, registration, benchmark = build_candidate(config, run_workspace, params)
    choices = steps.choose_per_device(evaluation, benchmark, params.devices)  # measured beats estimated
    publish_training(evaluation, registration, choices, overrides(params))
    get_run_logger().info("registered %s v%s (%s)", registration.registered_model, registration.version,
                          registration.variant)
    if package:
        publish_images(steps.package_images(config, run_workspace, registration.version))
    return registration
