"""The ``rollout`` flow: a registered version to a device group over MQTT, canary first, rolled back on harm.

Start it from the UI for any registered version with the cohort plan as parameters, or let ``retrain``
run it after an approval. Each step is an MLflow tag on the version and a Prefect artifact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.parameters import PARAMS_PATH, apply_override, overrides_of
from tasks.config import Params, RolloutParams, load_params
from tasks.rollout.classes import ClassRollout
from tasks.rollout.engine import Release, Rollout, RolloutReport, StageRecord
from tasks.rollout.records import dropped_summary

# What a person may change for one rollout: every field of ``rollout`` in params.yaml, optional (unset: its value
# there, after EDGELOOP_BROKER); generated from RolloutParams, so fields, bounds and descriptions are its own.
RolloutPlan = overrides_of(RolloutParams, "RolloutPlan", module=__name__)


def _step_markdown(report: RolloutReport) -> str:
    lines = [f"# Rollout of {report.model_name} {report.target} to group `{report.group}`", "",
             f"**{report.outcome.replace('_', ' ')}**" + (f": {report.reason}" if report.reason else ""), "",
             *([f"Untrusted input: {dropped}.", ""] if (dropped := dropped_summary(report)) else []),
             *(["| device class | variant | devices | outcome | reason |", "|---|---|---|---|---|",
                *[f"| {name} | {part.variant or '-'} | {len(part.devices)} | {part.outcome.replace('_', ' ')} | "
                  f"{part.reason or '-'} |" for name, part in report.classes.items()], ""] if report.classes else []),
             "| class | step | seq | action | version | devices | installed | failed | silent | p95 (ms) | "
             "error rate | confidence | problems |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    steps: list[StageRecord] = [*report.stages, *([report.rollback] if report.rollback else [])]
    for step in steps:
        figures = step.figures
        cells = [step.device_class or "all", step.name, str(step.sequence), step.action, step.version,
                 str(len(step.devices)),
                 str(len(step.installed)), str(len(step.failed)), ", ".join(step.missing[:5]) or "0",
                 f"{figures.p95_ms:.1f}" if figures and figures.p95_ms is not None else "-",
                 f"{figures.error_rate:.3f}" if figures and figures.error_rate is not None else "-",
                 f"{figures.mean_confidence:.3f}" if figures and figures.mean_confidence is not None else "-",
                 "; ".join(step.problems) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def rollout_for(channel, devices: dict[str, str | None], key, params: Params, target: Release,
                previous: Release | None, on_step) -> Rollout | ClassRollout:
    """A per-class rollout when the version chose a variant per device class and every device of the group has a
    class; otherwise one rollout of the version's own bundle to the whole group (devices without a class, or a
    version registered before per-class releases)."""
    settings, model = params.rollout, params.mlflow.registered_model
    if (target.classes or target.held) and devices and all(devices.values()):
        return ClassRollout(channel, {device: str(name) for device, name in devices.items()}, key, settings,
                            params.drift, model, target, previous, on_step=on_step)
    if target.classes and any(devices.values()):
        get_run_logger().warning("group %s mixes devices with and without a class: every device gets %s's own "
                                 "variant %s (give each a class with `edgeloop fleet add-device/enroll --class`)",
                                 settings.group, target.version, target.variant)
    return Rollout(channel, list(devices), key, settings, params.drift, model, target, previous, on_step=on_step)


def progress(rollout: Rollout | ClassRollout) -> RolloutReport:
    return rollout.summarise() if isinstance(rollout, ClassRollout) else rollout.report


@task(name="roll-out", cache_policy=NO_CACHE)
def roll_out(params: Params, version: str | None) -> RolloutReport:
    from edge.signing import load_public_keys
    from tasks.registry import tracking
    from tasks.registry.bundle import load_private_key
    from tasks.rollout import fleet as fleet_files
    from tasks.rollout import records
    from tasks.rollout.channel import MqttChannel

    logger = get_run_logger()
    tracking.configure(params.mlflow)
    settings = params.rollout
    target_version, previous_version = records.versions_to_roll(params.mlflow, version)
    target = records.release_of(params, target_version)
    previous = records.release_of(params, previous_version) if previous_version else None
    devices = fleet_files.load_fleet(settings.fleet_file).classes(settings.group)
    password, tls = None, None
    if settings.broker_tls:  # the control plane's own certificate from the fleet CA is its login
        tls = fleet_files.control_plane_tls(settings.fleet_ca_dir)
    else:
        password = fleet_files.ensure_control_plane(settings.credentials_dir)
    keys = load_public_keys([params.package.public_keys])
    with MqttChannel(settings.broker, settings.group, fleet_files.CONTROL_PLANE_USER, password, keys,
                     tls=tls) as channel:
        def on_step(step: StageRecord) -> None:
            try:
                records.tag_step(params.mlflow, target.version, step)
                create_markdown_artifact(key="rollout-progress", markdown=_step_markdown(progress(rollout)),
                                         description=f"{target.version}: {step.name} {step.action}")
            except Exception as error:  # a server away: the devices must not be left mid-rollout for a record
                logger.warning("could not record step %s (%s: %s); the final report keeps it",
                               step.name, type(error).__name__, error)
            logger.info("%s %s (seq %d): %d device(s), %d installed, %d failed, %d silent%s", step.name,
                        step.version, step.sequence, len(step.devices), len(step.installed), len(step.failed),
                        len(step.missing), f"; {'; '.join(step.problems)}" if step.problems else "")

        rollout = rollout_for(channel, devices, load_private_key(params.package.signing_key), params, target,
                              previous, on_step)
        report = rollout.run()
    records.record_outcome(params.mlflow, report)
    return report


@flow(name="rollout", log_prints=True)
def rollout(version: str | None = None, plan: RolloutPlan | None = None,
            report_dir: str = "reports/rollout") -> dict[str, Any]:
    """Roll a registered version out to a device group: canary, wider stages, automatic rollback.

    Args:
        version: registered model version number (default: the champion).
        plan: cohort plan and health limits for this rollout (defaults: rollout in params.yaml).
        report_dir: where the timeline chart and the JSON report go.
    """
    from tasks.rollout.records import log_rollout_run, timeline_chart

    params = load_params(PARAMS_PATH)  # with the environment's overrides (EDGELOOP_BROKER, the signing keys)
    params = params.model_copy(update={"rollout": apply_override(params.rollout, plan, "the rollout plan")})
    report = roll_out(params, version)
    folder = Path(report_dir) / report.rollout_id
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report.as_dict(), indent=2, default=str) + "\n")
    chart = timeline_chart(report, folder / "timeline.png")
    url, chart_url = log_rollout_run(params.mlflow, report, [folder / "report.json", chart])
    markdown = _step_markdown(report) + (f"\n![rollout timeline]({chart_url})\n" if chart_url else "") + \
        f"\nTimeline chart and report: {f'[MLflow run]({url})' if url else chart}\n"
    create_markdown_artifact(key="rollout", markdown=markdown, description=f"{report.target}: {report.outcome}")
    return report.as_dict()
