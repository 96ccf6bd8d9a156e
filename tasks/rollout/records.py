"""What a rollout needs from the registry, and what it leaves there.

- :func:`release_of`: a registered version as a :class:`~tasks.rollout.engine.Release`: its signed bundle
  (exported once into ``rollout.bundle_dir`` and reused, so every device installs the same bytes), the
  bundle's sha256, the URL devices fetch it from and the version's pinned image, when it was packaged; and,
  for a version that chose a variant per device class, each class's bundle (one per distinct variant).
- :func:`record_outcome`: model-version tags (``rollout``, ``rollout.reason``, ``rollout.id`` and, when the
  channel dropped device messages, ``rollout.dropped``) and, after a rollback of the champion, the
  ``champion`` alias back on the previous version.
- :func:`log_rollout_run`: the MLflow run of a rollout, with the dropped messages per reason as metrics.
- :func:`timeline_chart`: cohort size, version and health per step, as a PNG.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edge.files import sha256_file
from tasks.config import MlflowParams, Params, RolloutParams
from tasks.rollout.engine import Release, RolloutReport

log = logging.getLogger(__name__)
CHAMPION, PREVIOUS = "champion", "previous"


def bundle_url(settings: RolloutParams, bundle: Path) -> str:
    base = settings.bundle_base_url
    return f"{base.rstrip('/')}/{bundle.name}" if base else bundle.resolve().as_uri()


def _bundle(params: Params, version: str, tags: dict[str, str], device_class: str | None) -> Path:
    """The signed bundle of ``version`` for ``device_class`` (None: the version's own), exported on first use and
    shared by the classes that chose the same variant and runtime configuration (``bundle_file_name``)."""
    from tasks.registry.bundle import bundle_file_name, export_registered

    bundle = params.rollout.bundle_dir / bundle_file_name(params.mlflow.registered_model, version, tags, device_class)
    if not bundle.is_file():
        bundle.parent.mkdir(parents=True, exist_ok=True)
        export_registered(params.mlflow, bundle.parent, params.package.signing_key, alias=None, version=version,
                          device_class=device_class)
    return bundle


def release_of(params: Params, version: str) -> Release:
    """Registered ``version`` as devices will fetch it: its signed bundle and images and, when it chose a variant
    per device class (``device.<class>.variant`` tags), each class's bundle; classes it chose nothing for are
    ``held``. Each class's images are the ones packaged for it (``device.<class>.image.<arch>``); a version
    packaged before per-class images gives a class the version's own images when they carry its runtime, and
    none otherwise (its container devices take the model only)."""
    import mlflow

    from tasks.packaging.class_images import class_images_of
    from tasks.registry.bundle import chosen_variants
    from tasks.variants import VARIANTS

    name = params.mlflow.registered_model
    tags = mlflow.MlflowClient().get_model_version(name, version).tags
    images, variant = images_of(tags), tags.get("variant")
    runtime = tags.get("runtime")
    own = _bundle(params, version, tags, None)
    classes, held = {}, {}
    for device_class, chosen in sorted(chosen_variants(tags).items()):
        if chosen == "none" or chosen not in VARIANTS:
            held[device_class] = (f"the release has no variant for it ({tags.get(f'device.{device_class}.rule')} "
                                  "rule): it stays on the version it runs")
            continue
        bundle = _bundle(params, version, tags, device_class)
        needs = VARIANTS[chosen].runtime
        mine = class_images_of(tags, device_class) or (images if needs == runtime else {})
        classes[device_class] = Release(f"v{version}", bundle_url(params.rollout, bundle), sha256_file(bundle),
                                        mine.get("amd64"), mine, chosen, needs)
    return Release(f"v{version}", bundle_url(params.rollout, own), sha256_file(own), images.get("amd64"), images,
                   variant, runtime, classes, held)


def images_of(tags: dict[str, str]) -> dict[str, str]:
    """The pushed images of a registered version, by architecture: its ``image.<arch>`` tags pinned by digest
    (``edgeloop package`` sets them; an image that was built but not pushed has no such tag)."""
    from edge.rollout import ARCH, DIGEST_REFERENCE

    found = {key.removeprefix("image."): value for key, value in tags.items() if key.startswith("image.")}
    return {arch: value for arch, value in found.items() if ARCH.fullmatch(arch) and DIGEST_REFERENCE.fullmatch(value)}


def versions_to_roll(settings: MlflowParams, version: str | None) -> tuple[str, str | None]:
    """(target, previous): ``version`` (default: the champion) and the version the devices run now."""
    from tasks.registry.promotion import version_by_alias

    name = settings.registered_model
    champion = version_by_alias(name, CHAMPION)
    if version is None:
        if champion is None:
            raise ValueError(f"{name} has no champion to roll out; approve a retrain or name a version")
        previous = version_by_alias(name, PREVIOUS)
        return str(champion.version), str(previous.version) if previous else None
    if champion is not None and str(champion.version) != str(version):
        return str(version), str(champion.version)
    previous = version_by_alias(name, PREVIOUS)
    return str(version), str(previous.version) if previous else None


def record_outcome(settings: MlflowParams, report: RolloutReport) -> None:
    """Tag the target version with the outcome; after a rolled-back champion, point ``champion`` back."""
    import mlflow

    client, name = mlflow.MlflowClient(), settings.registered_model
    target = report.target.removeprefix("v")
    state = {"completed": "completed", "rolled_back": "rolled-back", "partial": "partial", "failed": "failed",
             "in_progress": "in-progress"}[report.outcome]
    client.set_model_version_tag(name, target, "rollout", state)
    client.set_model_version_tag(name, target, "rollout.id", report.rollout_id)
    if report.reason:
        client.set_model_version_tag(name, target, "rollout.reason", report.reason[:4900])
    if dropped := dropped_summary(report):
        client.set_model_version_tag(name, target, "rollout.dropped", dropped[:4900])
    for device_class, part in report.classes.items():  # a per-class rollout: how each class ended
        ended = part.outcome.replace("_", "-") + (f": {part.reason}" if part.reason else "")
        client.set_model_version_tag(name, target, f"rollout.class.{device_class}", ended[:4900])
    if report.outcome != "rolled_back" or report.previous is None:
        return
    champion = client.get_model_version_by_alias(name, CHAMPION) if _has_alias(client, name, CHAMPION) else None
    if champion is not None and str(champion.version) == target:
        previous = report.previous.removeprefix("v")
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.delete_registered_model_alias(name, PREVIOUS)
        log.warning("champion alias moved back from version %s to %s: %s", target, previous, report.reason)


def dropped_by_reason(report: RolloutReport) -> dict[str, int]:
    """The device messages the channel dropped during ``report``'s rollout, per reason (all devices)."""
    totals: dict[str, int] = {}
    for reasons in report.dropped_messages.values():
        for reason, count in reasons.items():
            totals[reason] = totals.get(reason, 0) + count
    return dict(sorted(totals.items()))


def dropped_summary(report: RolloutReport) -> str:
    """One line on the dropped device messages ('' when none): how many, from which devices, why."""
    totals = dropped_by_reason(report)
    if not totals:
        return ""
    devices = sorted(report.dropped_messages)
    return (f"{sum(totals.values())} device message(s) dropped ("
            + ", ".join(f"{reason} {count}" for reason, count in totals.items())
            + f") from {len(devices)} device(s): {', '.join(devices[:10])}{' ...' if len(devices) > 10 else ''}")


def step_tag(step) -> str:
    """The model-version tag of a step: ``rollout.step.canary``, ``rollout.step.25pct``, ``rollout.step.rollback``."""
    return f"rollout.step.{step.name.replace('%', 'pct')}"


def tag_step(settings: MlflowParams, target: str, step) -> None:
    """One tag per step on the target version (:func:`step_tag`) saying what happened, for the registry's UI."""
    import mlflow

    summary = (f"seq {step.sequence} {step.action} {step.version}: {len(step.installed)}/{len(step.devices)} "
               f"installed, {len(step.failed)} failed, {len(step.missing)} silent"
               + (f"; {'; '.join(step.problems)}" if step.problems else ""))
    mlflow.MlflowClient().set_model_version_tag(settings.registered_model, target.removeprefix("v"),
                                                step_tag(step), summary[:4900])


def log_rollout_run(settings: MlflowParams, report: RolloutReport, files: list[Path]) -> tuple[str | None, str | None]:
    """An MLflow run per rollout (experiment ``edgeloop-rollout``) with the report and chart (under ``rollout/``).

    Returns the run's UI address and the download address of its chart (both None for a local store).
    """
    import mlflow

    from tasks.registry import tracking
    uri = tracking.configure(settings)
    experiment = tracking.ensure_experiment(settings.model_copy(update={"experiment": "edgeloop-rollout"}))
    with mlflow.start_run(experiment_id=experiment, run_name=report.rollout_id) as run:
        mlflow.set_tags({"edgeloop.stage": "rollout", "rollout.outcome": report.outcome,
                         "rollout.target": report.target, "rollout.previous": str(report.previous),
                         "rollout.group": report.group})
        dropped = dropped_by_reason(report)
        mlflow.log_metrics({"stages": len(report.stages), "devices": len(report.stages[-1].devices)
                            if report.stages else 0, "rolled_back": int(report.outcome == "rolled_back"),
                            "dropped_messages": sum(dropped.values()),
                            **{f"dropped_messages.{reason}": count for reason, count in dropped.items()}})
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="rollout")
    url = tracking.run_url(uri, experiment, run.info.run_id)
    charts = [path.name for path in files if path.suffix == ".png"]
    chart = (f"{uri.rstrip('/')}/get-artifact?path=rollout/{charts[0]}&run_uuid={run.info.run_id}"
             if url and charts else None)
    return url, chart


def _has_alias(client, name: str, alias: str) -> bool:
    return alias in (client.get_registered_model(name).aliases or {})


def timeline_chart(report: RolloutReport, path: Path) -> Path:
    """Cohort size per step, coloured by health, labelled with the version and acknowledgements."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [*report.stages, *([report.rollback] if report.rollback else [])]
    figure, axis = plt.subplots(figsize=(max(5, 1.6 * len(steps)), 3.2))
    for index, step in enumerate(steps):
        healthy = not step.problems and not step.failed and not (step.action == "install" and step is
                                                                  report.stages[-1] and report.outcome != "completed")
        colour = "#c0392b" if step.action == "rollback" else ("#27ae60" if healthy else "#e67e22")
        axis.bar(index, len(step.devices), color=colour)
        health = [f"{label} {value:{spec}}" for label, value, spec in (
            ("conf", step.figures.mean_confidence if step.figures else None, ".2f"),
            ("p95", step.figures.p95_ms if step.figures else None, ".1f"),
            ("err", step.figures.error_rate if step.figures else None, ".1%")) if value is not None]
        axis.text(index, len(step.devices), "\n".join([step.version, f"{len(step.installed)}/{len(step.devices)} "
                                                       "acked", *health]), ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(steps)), [f"{s.name}\n(seq {s.sequence})" for s in steps], fontsize=8)
    axis.set_ylabel("devices in the step")
    axis.set_title(f"{report.model_name} {report.target}: {report.outcome.replace('_', ' ')}", fontsize=10)
    axis.margins(y=0.3)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
