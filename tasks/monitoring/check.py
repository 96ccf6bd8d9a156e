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

from edge.sidecar import atomic_write_text
from tasks.config import PARAMS_FILE, Params, load_params
from tasks.entrypoint import report_user_errors, setup_logging
from tasks.errors import ConfigError, StageError
from tasks.monitoring.analysis import WindowAnalysis, analyse
from tasks.monitoring.collected import Window, consolidate
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


def registered_versions(params: Params) -> set[str]:
    """Every way a device may name a registered version: ``3``, ``v3`` and its image semver (MLflow configured)."""
    import mlflow

    names: set[str] = set()
    for version in mlflow.MlflowClient().search_model_versions(f"name='{params.mlflow.registered_model}'"):
        names |= {str(version.version), f"v{version.version}"}
        if version.tags.get("image.version"):
            names.add(version.tags["image.version"])
    return names


def load_check_reference(params: Params, scratch: Path) -> tuple[str, Reference]:
    """The reference of ``drift.reference``: the champion's (from MLflow, configured) or a file; with a label."""
    if params.drift.reference != CHAMPION:
        path = Path(params.drift.reference)
        if not path.is_file():
            raise ConfigError(f"drift.reference {path} is not a file; give a reference .npz or 'champion'")
        return str(path), read_reference(path)
    from tasks.registry.promotion import download_drift_reference

    found = download_drift_reference(params.mlflow.registered_model, CHAMPION, scratch)
    if found is None:
        raise StageError(f"{params.mlflow.registered_model} has no champion yet, so there is no reference to "
                         "compare with; approve a retrain (or set drift.reference to a reference .npz)")
    version, path = found
    return f"champion v{version}", read_reference(path)


def run_check(params: Params, report_root: Path, consume: bool = True, check_versions: bool = True) -> CheckOutcome:
    """Consolidate the pending uploads into a window and analyse it; reports under ``report_root/<window>``."""
    if check_versions or params.drift.reference == CHAMPION:
        from tasks.registry import tracking
        tracking.configure(params.mlflow)  # once: the champion's reference and the registered versions
    with tempfile.TemporaryDirectory(prefix="edgeloop-drift-") as scratch:
        label, reference = load_check_reference(params, Path(scratch))
    known = registered_versions(params) if check_versions else None
    window = consolidate(params.drift.collected_dir, known, consume=consume)
    report_dir = Path(report_root) / window.window_id
    report_dir.mkdir(parents=True, exist_ok=True)
    analysis = analyse(window.window_id, window.arrays, reference, params.drift, seed=params.seed,
                       html=report_dir / "report.html")
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


def prometheus_text(outcome: CheckOutcome) -> str:
    """The headline figures in Prometheus' text format (for node_exporter's textfile collector)."""
    analysis, decision = outcome.analysis, outcome.decision
    figures = {
        "edgeloop_drift_window_rows": (analysis.rows, "rows in the newest window"),
        "edgeloop_drift_share": (analysis.drift_share, "share of feature columns drifted"),
        "edgeloop_drift_dataset_drift": (int(analysis.dataset_drift), "1 when the dataset drifted"),
        "edgeloop_drift_prediction_score": (analysis.prediction.score if analysis.prediction else None,
                                            "predicted-class drift score"),
        "edgeloop_drift_mean_confidence": (analysis.mean_confidence, "mean top-class confidence"),
        "edgeloop_drift_latency_p95_ms": (analysis.latency_p95_ms, "device latency p95 (ms)"),
        "edgeloop_drift_exceeded": (int(analysis.exceeded), "1 when the window exceeded the thresholds"),
        "edgeloop_drift_invalid": (int(analysis.status == "invalid"), "1 when the window was invalid"),
        "edgeloop_drift_streak": (decision.streak if decision else None, "consecutive exceeded windows"),
        "edgeloop_drift_triggered": (int(bool(decision and decision.fire)), "1 when this check started a retrain"),
        "edgeloop_drift_quarantined_files": (len(outcome.window.quarantined), "uploads quarantined by this check"),
    }
    lines = []
    for name, (value, meaning) in figures.items():
        if value is not None:
            lines += [f"# HELP {name} {meaning}", f"# TYPE {name} gauge", f"{name} {float(value):.6g}"]
    return "\n".join(lines) + "\n"


def write_prometheus(outcome: CheckOutcome, path: Path) -> None:
    atomic_write_text(Path(path), prometheus_text(outcome))


def log_check(params: Params, outcome: CheckOutcome) -> None:
    """A run per check in the ``drift.experiment`` MLflow experiment: figures, tests, HTML and JSON reports."""
    import mlflow

    from tasks.registry import tracking
    uri = tracking.configure(params.mlflow)
    experiment_id = tracking.ensure_experiment(params.mlflow.model_copy(update={"experiment": params.drift.experiment}))
    analysis = outcome.analysis
    metrics = {"rows": analysis.rows, "drifted_features": len(analysis.drifted_features),
               "exceeded": int(analysis.exceeded), "quarantined_files": len(outcome.window.quarantined),
               "duplicates": outcome.window.duplicates}
    for key in ("drift_share", "mean_confidence", "latency_p95_ms"):
        if getattr(analysis, key) is not None:
            metrics[key] = getattr(analysis, key)
    if analysis.prediction is not None:
        metrics["prediction_score"] = analysis.prediction.score
    metrics |= {f"feature.{name}": score.score for name, score in analysis.features.items()}
    if outcome.decision is not None:
        metrics |= {"streak": outcome.decision.streak, "triggered": int(outcome.decision.fire)}
    with mlflow.start_run(experiment_id=experiment_id, run_name=f"drift-{analysis.window_id}") as run:
        mlflow.log_params({"feature_test": params.drift.feature_test.model_dump_json(),
                           "prediction_test": params.drift.prediction_test.model_dump_json(),
                           "drift_share": params.drift.drift_share, "min_samples": params.drift.min_samples,
                           "consecutive_windows": params.drift.consecutive_windows,
                           "cooldown_h": params.drift.cooldown_h, "reference": analysis.reference})
        mlflow.log_metrics(metrics)
        mlflow.set_tags({"edgeloop.stage": "drift-check", "drift.status": analysis.status,
                         "drift.window": analysis.window_id, "drift.reference": analysis.reference,
                         "drift.triggered": str(bool(outcome.decision and outcome.decision.fire)).lower()})
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
        params = params.model_copy(update={"drift": params.drift.model_copy(update=update)})
        outcome = run_check(params, args.out, consume=args.consume, check_versions=not args.no_version_check)
        analysis = outcome.analysis
        print(f"window {analysis.window_id}: {analysis.rows} rows from {len(outcome.window.files)} file(s), "
              f"status {analysis.status}, reference {analysis.reference}")
        for reason in analysis.reasons:
            print(f"  - {reason}")
        print(f"report: {outcome.report_dir / 'report.html'}")

    return report_user_errors(check)


if __name__ == "__main__":
    raise SystemExit(main())
