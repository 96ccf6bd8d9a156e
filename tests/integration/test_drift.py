"""The drift check against a real Prefect server (state variable, events, the on-drift trigger and worker) and a
real MLflow server (the candidate's drift reference, a run per check), on simulated device uploads."""

from __future__ import annotations

import io
import json
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from tests.stack_helpers import mlflow_client, read_run, wait_for

pytestmark = pytest.mark.integration
MODEL_NAME = "edgeloop-digits"


def _retrain_runs_for(windows: set[str]) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["on-drift"])))
    return [run for run in runs if (run.parameters.get("drift_summary") or {}).get("window_id") in windows]


def _drift_events_for(windows: set[str], since) -> list:
    """The edgeloop.drift.detected events the Prefect server stored for these windows."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter

    from flows.drift_check import DRIFT_EVENT

    with get_client(sync_client=True) as client:
        page = client.read_events(filter=EventFilter(occurred=EventOccurredFilter(since=since),
                                                     event=EventNameFilter(name=[DRIFT_EVENT])), limit=50)
    return [event for event in page.events if event.payload.get("window_id") in windows]


def _final_state_of(flow_run_id):
    state = read_run(flow_run_id).state
    return state if state is not None and state.is_final() else None


def _cancel(flow_run) -> None:
    """Cancel the retrain run (don't train a full model in the test) and wait until it is in a final state."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run.id, Cancelled(message="test: trigger verified"), force=True)
    final = wait_for(lambda: _final_state_of(flow_run.id), 60, f"retrain run {flow_run.id} to reach a final state")
    assert final.is_cancelled(), f"the cancelled retrain run ended {final.type.value}: {final.message}"


class Devices:
    """Two simulated devices uploading windows of the nightly model's test split, served by the model itself."""

    def __init__(self, workspace: Path, collected: Path, version: str) -> None:
        from edge.runtime import EdgeModel
        from tasks.monitoring.simulate_drift import timed_predictor
        from tasks.workspace import Workspace, load_arrays

        work = Workspace(workspace)
        test = load_arrays(work.split_file("test"), "prepare")
        self.x, self.y = test["x"], test["y"]
        self.predict = timed_predictor(EdgeModel.load(work.variant_file("tflite_int8")))
        self.collected, self.version, self.rng = collected, version, np.random.default_rng(0)
        self.count = 0

    def window(self, severity: str, samples: int = 240):
        from tasks.monitoring.simulate_drift import DEFAULT_KINDS, simulate_window, write_uploads

        now = time.time()
        window = simulate_window(self.x, self.y, self.predict, severity, DEFAULT_KINDS, self.rng, samples,
                                 now - 60, now)
        self.count += 1
        return write_uploads(window, self.collected, ["sim-a", "sim-b"], self.version, self.count, severity,
                             uuid.uuid4().hex[:8])


def _without_some_features(path: Path) -> bytes:
    with np.load(path, allow_pickle=False) as archive:
        arrays = {key: archive[key] for key in archive.files}
    arrays["features"], arrays["feature_names"] = arrays["features"][:, :10], arrays["feature_names"][:10]
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def test_two_drifted_windows_fire_one_retrain_and_the_policy_holds_back_otherwise(stack, nightly_run, tmp_path):
    from prefect.events.worker import EventsWorker
    from prefect.variables import Variable

    from flows.drift_check import drift_check
    from tasks.contracts import Workspace, read_registration
    from tasks.monitoring.reference import REFERENCE_ARTIFACT
    from tasks.registry.promotion import run_artifact

    started = datetime.now(UTC)
    # the nightly's own version (by number: other tests move the candidate alias to versions of their own)
    registered = read_registration(Workspace(Path(nightly_run.parameters["workspace"]))).version
    candidate = mlflow_client(stack).get_model_version(MODEL_NAME, str(registered))
    reference = run_artifact(candidate, REFERENCE_ARTIFACT, tmp_path / "reference")
    assert reference is not None, f"version {registered} has no {REFERENCE_ARTIFACT}"
    collected, reports = tmp_path / "collected", tmp_path / "reports"
    devices = Devices(Path(nightly_run.parameters["workspace"]), collected, f"v{candidate.version}")
    variable = f"drift-test-{uuid.uuid4().hex[:8]}"
    settings = {"reference": str(reference), "state_variable": variable, "cooldown_h": 0,
                "metrics_file": str(tmp_path / "drift.prom")}

    def check(**changes) -> dict:
        return drift_check(collected_dir=str(collected), settings={**settings, **changes}, report_dir=str(reports))

    # an undrifted window: within the thresholds
    devices.window("none")
    calm = check()
    assert calm["status"] == "ok" and not calm["drift_detected"] and calm["rows"] == 240
    # one medium-drift window alone fires nothing
    devices.window("medium")
    first = check()
    assert first["status"] == "drift" and not first["drift_detected"] and first["decision"]["streak"] == 1
    assert first["drift_share"] >= 0.5 and first["drifted_features"]
    # a drifted window under min_samples: no verdict, fires nothing
    devices.window("medium", samples=20)
    small = check()
    assert small["status"] == "too_small" and not small["drift_detected"]
    # a window whose features miss columns is invalid, not drift; a corrupt upload is quarantined with its reason
    for written in devices.window("medium", samples=60):
        written.write_bytes(_without_some_features(written))
    (collected / "sim-a--torn.npz").write_bytes(b"PK\x03\x04 torn in transit")
    invalid = check()
    assert invalid["status"] == "invalid" and "are missing" in invalid["reasons"][0] and not invalid["drift_detected"]
    assert "sim-a--torn.npz" in invalid["quarantined"]
    assert (collected / "quarantine" / "sim-a--torn.npz").read_bytes().startswith(b"PK")
    assert "not a readable .npz" in (collected / "quarantine" / "sim-a--torn.npz.reason.txt").read_text()
    # the second exceeded window with a verdict fires: one event, one retrain run
    devices.window("medium")
    second = check()
    assert second["drift_detected"] and second["decision"]["streak"] == 2
    retrain = wait_for(lambda: next(iter(_retrain_runs_for({second["window_id"]})), None), 60,
                       "the edgeloop.drift.detected trigger to create a retrain run")
    _cancel(retrain)
    assert retrain.parameters["drift_summary"]["reasons"] == second["reasons"]
    # the drift goes on for two more windows, but the retrain just started: in cooldown, nothing fires
    devices.window("medium")
    cooling = check(cooldown_h=1)
    devices.window("medium")
    held = check(cooldown_h=1)
    assert held["decision"]["streak"] == 2 and "in cooldown" in held["decision"]["reason"]
    assert not held["drift_detected"]

    checks = [calm, first, small, invalid, second, cooling, held]
    windows = {c["window_id"] for c in checks}
    # no sleep guessing how long an extra trigger would take: every event the checks emitted (in this process)
    # has been sent, the server stored the one that fired, and that one event made one retrain run
    EventsWorker.instance().wait_until_empty()
    events = wait_for(lambda: _drift_events_for(windows, started), 60, "the server to store the drift event")
    assert [event.payload["window_id"] for event in events] == [second["window_id"]]
    assert len(_retrain_runs_for(windows)) == 1
    # the state lives in the Prefect server; every check is an MLflow run with its Evidently report
    state = Variable.get(variable)
    statuses = [verdict["status"] for verdict in state["verdicts"]]
    assert statuses == ["ok", "drift", "too_small", "invalid", "drift", "drift", "drift"]
    assert state["last_trigger_window"] == second["window_id"]
    client = mlflow_client(stack)
    experiment = client.get_experiment_by_name("edgeloop-drift")
    runs = client.search_runs([experiment.experiment_id], f"tags.`drift.window` = '{second['window_id']}'")
    assert len(runs) == 1 and runs[0].data.tags["drift.triggered"] == "true"
    assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "drift")} == {"drift/report.html",
                                                                                      "drift/summary.json"}
    assert json.loads((reports / second["window_id"] / "summary.json").read_text())["drift_detected"] is True
    prom = (tmp_path / "drift.prom").read_text()
    assert "edgeloop_drift_streak 2" in prom and "edgeloop_drift_triggered 0" in prom  # the last check's figures
