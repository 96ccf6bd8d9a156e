"""What a package run leaves: its report (``reports/package.json``), its MLflow ``package`` run, and the image
tags on the model version (``image.<arch>`` for the registered variant, ``device.<class>.image.<arch>`` for
each device class's image)."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from edge.files import atomic_write_text
from tasks.config import MlflowParams, PackageParams
from tasks.packaging.class_images import class_image_tag
from tasks.packaging.image_checks import ImageRecord
from tasks.workspace import Workspace

REPORT_SCHEMA = "edgeloop.package/1"


class PackageReport(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    schema_id: str = REPORT_SCHEMA
    model_name: str
    mlflow_version: str
    variant: str
    version: str
    version_reason: str
    created_at: str
    images: list[ImageRecord]



def record_in_mlflow(mlflow_settings: MlflowParams, settings: PackageParams, report: PackageReport,
                     source_run_id: str) -> None:
    """A ``package`` run with every figure (FAILED when a gate failed); image tags on the model version if shipped."""
    import mlflow

    from tasks.registry.tracking import ensure_experiment

    # shipped: every image pushed, or (a partial release) every image pushed or failed
    shipped = any(record.digest for record in report.images) and all(
        record.digest or (settings.partial_release and record.failures) for record in report.images)
    experiment_id = ensure_experiment(mlflow_settings)
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"package-v{report.version}") as run:
        mlflow.set_tags({"edgeloop.stage": "package", "source_run_id": source_run_id,
                         "registered_model": report.model_name, "model_version": report.mlflow_version,
                         "image.version": report.version, "image.version_reason": report.version_reason})
        mlflow.log_params({"package.max_image_mb": settings.max_image_mb, "package.max_start_s": settings.max_start_s,
                           "package.check_device": settings.check_device,
                           "package.platforms": ",".join(settings.platforms)})
        for record in report.images:
            figures = {"mb": record.image_mb, "ready_s": record.ready_s,
                       "max_abs_score_diff": record.max_abs_score_diff, "label_agreement": record.label_agreement}
            key = _image_key(report, record)
            mlflow.log_metrics({f"{key}.{name}": value for name, value in figures.items() if value is not None})
            mlflow.set_tag(key, record.pinned or f"{record.reference} ({record.status})")
            mlflow.set_tag(f"{key}.emulated", str(record.emulated).lower())
        mlflow.log_dict(report.model_dump(mode="json"), "package.json")
        if not shipped:
            mlflow.end_run(status="FAILED")
            return
        client = mlflow.MlflowClient()
        client.set_model_version_tag(report.model_name, report.mlflow_version, "image.version", report.version)
        client.set_model_version_tag(report.model_name, report.mlflow_version, "image.package_run_id",
                                     run.info.run_id)
        for record in (record for record in report.images if record.digest):
            if record.variant in ("", report.variant):
                client.set_model_version_tag(report.model_name, report.mlflow_version, f"image.{record.arch}",
                                             record.pinned)
            for device_class in record.classes:
                client.set_model_version_tag(report.model_name, report.mlflow_version,
                                             class_image_tag(device_class, record.arch), record.pinned)


def _image_key(report: PackageReport, record: ImageRecord) -> str:
    """``image.<arch>`` for the registered variant's image, ``image.<arch>.<variant>`` for a class's other one."""
    return f"image.{record.arch}" if record.variant in ("", report.variant) else f"image.{record.arch}.{record.variant}"


def write_report(workspace: Workspace, report: PackageReport) -> Path:
    path = workspace.package_file
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(report.model_dump(mode="json"), indent=2) + "\n")
    return path


def describe(report: PackageReport) -> str:
    lines = [f"{report.model_name} version {report.mlflow_version} ({report.variant}) -> {report.version} "
             f"({report.version_reason})"]
    for record in report.images:
        timing = f"ready {record.ready_s:.2f} s" if record.ready_s is not None else "not started"
        emulated = " (emulated)" if record.emulated else ""
        size = f"{record.image_mb:.1f} MB" if record.image_mb is not None else "size n/a"
        serves = f" for {', '.join(record.classes)}" if record.classes else ""
        lines.append(f"  {record.status:16s} {record.pinned or record.reference or record.platform}  {size}, "
                     f"{timing}{emulated}  [{record.variant}{serves}]")
        lines.extend(f"    {failure}" for failure in record.failures)
    return "\n".join(lines)
