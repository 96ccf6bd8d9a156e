"""One drift check: pending uploads -> a window -> Evidently analysis -> reports, MLflow run, Prometheus figures.

    edgeloop drift-check [--collected-dir D] [--reference champion|FILE] [--consume] [--out DIR]

The Prefect flow (``flows/drift_check.py``) runs the same functions and adds the trigger policy, whose
state lives in the Prefect server. From a terminal the check reads and reports only: uploads stay
pending unless ``--consume`` (then the window is written as the flow would; malformed uploads are
quarantined either way), and no retrain is ever triggered from here.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.files import atomic_write_text
from tasks.config import PARAMS_FILE, DriftParams, MlflowParams, load_params
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError, StageError
from tasks.monitoring.analysis import WindowAnalysis, analyse
from tasks.monitoring.collected import Window, consolidate
from tasks.monitoring.figures import mlflow_metrics, prometheus_text
from tasks.monitoring.policy import Decision
from tasks.monitoring.reference import Reference, read_reference

log = logging.getLogger(__name__)
CHAMPION = "champion"


@dataclass
class CheckOutcome:
    window: Window
    analysis: WindowAnalysis
    report_dir: Path             # report.html (Evidently) and summary.json
    decision: Decision | None = None
    mlflow_run_url: str | None = None
    mlflow_run_id: str | None = None

    def summary(self) -> dict[str, Any]:
        """The JSON summary: the verdict, the figures, the decision; the trigger event's payload."""
        analysis = self.analysis
        return {
            "schema": "edgeloop.drift-check/1",
            **analysis.as_dict(),
            "drift_detected": bool(self.decision and self.decision.fire),
            "decision": None if self.decision is None else {
                "fire": self.decision.fire, "streak": self.decision.streak, "reason": self.decision.reason,
                "cooldown_until": self.decision.cooldown_until},
            "files": len(self.window.files), "quarantined": self.window.quarantined,
            "duplicates": self.window.duplicates,
            "window_file": None if self.window.path is None else str(self.window.path),
            "report_html": str(self.report_dir / "report.html") if (self.report_dir / "report.html").is_file()
            else None,
            "mlflow_run": self.mlflow_run_url or self.mlflow_run_id,
        }


def registered_versions(registered_model: str) -> set[str]:
    """Every way a device may name a registered version: ``3``, ``v3`` and its image semver (MLflow configured)."""
    import mlflow

    names: set[str] = set()
    for version in mlflow.MlflowClient().search_model_versions(f"name='{registered_model}'"):
        names |= {str(version.version), f"v{version.version}"}
        if version.tags.get("image.version"):
            names.add(version.tags["image.version"])
    return names


def load_check_reference(reference: str, registered_model: str, scratch: Path) -> tuple[str, Reference]:
    """The reference of ``drift.reference``: the champion's (from MLflow, configured) or a file; with a label."""
    if reference != CHAMPION:
        path = Path(reference)
        if not path.is_file():
            raise ConfigError(f"drift.reference {path} is not a file; give a reference .npz or 'champion'")
        return str(path), read_reference(path)
    from tasks.registry.promotion import download_drift_reference

    found = download_drift_reference(registered_model, CHAMPION, scratch)
    if found is None:
        raise StageError(f"{registered_model} has no champion yet, so there is no reference to "
                         "compare with; approve a retrain (or set drift.reference to a reference .npz)")
    version, path = found
    return f"champion v{version}", read_reference(path)


def run_check(drift: DriftParams, mlflow_params: MlflowParams, report_root: Path, *, seed: int,
              consume: bool = True, check_versions: bool = True) -> CheckOutcome:
    """Consolidate the pending uploads into a window and analyse it; reports under ``report_root/<window>``.

    Args:
        drift: the ``drift`` section (uploads, reference, tests, rules).
        mlflow_params: the ``mlflow`` section: the registry holding the champion's reference and the versions.
        seed: seed of the sampling of windows above ``drift.max_rows``.
    """
    if check_versions or drift.reference == CHAMPION:
        from tasks.registry import tracking
        tracking.configure(mlflow_params)  # once: the champion's reference and the registered versions
    with tempfile.TemporaryDirectory(prefix="edgeloop-drift-") as scratch:
        label, reference = load_check_reference(drift.reference, mlflow_params.registered_model, Path(scratch))
    known = registered_versions(mlflow_params.registered_model) if check_versions else None
    window = consolidate(drift.collected_dir, known, consume=consume)
    report_dir = Path(report_root) / window.window_id
    report_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(window.window_id, window.arrays, reference, drift, seed=seed, html=report_dir / "report.html")
    analysis.reference = label
    if window.quarantined:
        analysis.reasons.append(f"{len(window.quarantined)} upload(s) quarantined: "
                                + "; ".join(f"{name}: {why}" for name, why in list(window.quarantined.items())[:3]))
    outcome = CheckOutcome(window, analysis, report_dir)
    write_summary(outcome)
    return outcome


def write_summary(outcome: CheckOutcome) -> Path:
    path = outcome.report_dir / "summary.json"
    atomic_write_text(path, json.dumps(outcome.summary(), indent=2, default=str) + "\n")
    return path


def write_prometheus(outcome: CheckOutcome, path: Path) -> None:
    """The headline figures (:mod:`tasks.monitoring.figures`) for node_exporter's textfile collector."""
    atomic_write_text(Path(path), prometheus_text(outcome.summary()))


def log_check(drift: DriftParams, mlflow_params: MlflowParams, outcome: CheckOutcome) -> None:
    """A run per check in the ``drift.experiment`` MLflow experiment: figures, tests, HTML and JSON reports."""
    import mlflow

    from tasks.registry import tracking
    uri = tracking.configure(mlflow_params)
    experiment_id = tracking.ensure_experiment(mlflow_params.model_copy(update={"experiment": drift.experiment}))
    analysis = outcome.analysis
    summary = outcome.summary()
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-{analysis.window_id}") as run:
        mlflow.log_params({"feature_test": drift.feature_test.model_dump_json(),
                           "prediction_test": drift.prediction_test.model_dump_json(),
                           "drift_share": drift.drift_share, "min_samples": drift.min_samples,
                           "consecutive_windows": drift.consecutive_windows,
                           "cooldown_h": drift.cooldown_h, "reference": analysis.reference})
        mlflow.log_metrics(mlflow_metrics(summary))
        mlflow.set_tags({"edgeloop.stage": "drift-check", "drift.status": analysis.status,
                         "drift.window": analysis.window_id, "drift.reference": analysis.reference,
                         "drift.triggered": str(summary["drift_detected"]).lower()})
        outcome.mlflow_run_id = run.info.run_id
        outcome.mlflow_run_url = tracking.run_url(uri, experiment_id, run.info.run_id)
        write_summary(outcome)
        for name in ("report.html", "summary.json"):
            if (outcome.report_dir / name).is_file():
                mlflow.log_artifact(str(outcome.report_dir / name), artifact_path="drift")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgeloop drift-check", description=(
        "analyse the uploads pending in drift.collected_dir against the reference (no retrain is triggered)"))
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
    parser.add_argument("--collected-dir", type=Path, help="where uploads are (default: drift.collected_dir)")
    parser.add_argument("--reference", help="'champion' (from MLflow) or a reference .npz (default: drift.reference)")
    parser.add_argument("--consume", action="store_true", help="write the window and move the uploads like the flow")
    parser.add_argument("--no-version-check", action="store_true",
                        help="accept uploads of any model version (no MLflow registry at hand)")
    parser.add_argument("--out", type=Path, default=Path("reports/drift"), help="report folder (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()

    def check() -> None:
        params = load_params(args.params)
        update = {key: value for key, value in (("collected_dir", args.collected_dir),
                                                 ("reference", args.reference)) if value}
        outcome = run_check(params.drift.model_copy(update=update), params.mlflow, args.out, seed=params.seed,
                            consume=args.consume, check_versions=not args.no_version_check)
        analysis = outcome.analysis
        print(f"window {analysis.window_id}: {analysis.rows} rows from {len(outcome.window.files)} file(s), "
              f"status {analysis.status}, reference {analysis.reference}")
        for reason in analysis.reasons:
            print(f"  - {reason}")
        print(f"report: {outcome.report_dir / 'report.html'}")

    return report_user_errors(check)


if __name__ == "__main__":
    raise SystemExit(main())
