"""``make demo-loop``: the whole loop on one machine, from a drifting fleet back to a healthy one.

1. The champion (``make demo``'s candidate, promoted once with a recorded bootstrap approval when there is
   no champion yet) is served by ``--devices`` simulated devices: each the real edge service and updater
   with its own store and broker login (:mod:`scripts.device_fleet`), on a Mosquitto (``rollout.broker``)
   with the demo fleet's password file and ACL (under ``.run/demo-loop``, not the project's fleet file).
2. Their traffic drifts (noise, blur, brightness at ``high``); they sample it and upload to
   ``drift.collected_dir``. The ``drift-check/hourly`` deployment runs until the policy fires
   ``edgeloop.drift.detected``, and the ``retrain/on-drift`` automation starts a retrain. The traffic
   then goes back to normal (the cause fixed on site), which is what the rollout's health compares on.
3. The retrain waits at the approval gate. ``--interactive`` waits for you in the Prefect UI (or
   ``edgeloop approve``); otherwise the demo approves as reviewer ``demo-loop``. Then the images are
   packaged, the challenger becomes champion and the rollout goes canary -> 25% -> 100%.
4. Run two: a deliberately bad challenger (one epoch, gates lowered so it registers) is approved; its canary
   reports a far lower confidence than the previous version on the same devices and the rollout rolls it
   back: every device returns, the ``champion`` alias too.

For the demo the ``retrain/on-drift`` deployment's default parameters are set to a fast training and a
short rollout plan (visible in the UI) and put back at the end. Everything the devices write stays under
``.run/demo-loop``; the devices and the broker stop at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from flows.parameters import PARAMS_PATH, apply_override, default_parameters
from scripts.device_fleet import DeviceFleet
from tasks.config import Params, load_params
from tasks.errors import EdgeloopError
from tasks.rollout.engine import Release
from tasks.stack import mosquitto
from tasks.stack.services import REPO_ROOT, ServiceError

RUN_DIR = REPO_ROOT / ".run" / "demo-loop"
PREFIX = "demo"
# The retrain trains as long as the champion did (params.yaml's epochs): a shorter run makes a less confident
# model, and the canary's confidence limit (0.05 below the champion's) rightly rolls it back. Only the extras
# (QAT, pruning, six of the eight variants, arm64, other devices) are left out to keep the demo short.
FAST_TRAINING = {"strategy": "ptq", "prune": False, "variants": ["tflite_fp32", "tflite_int8"],
                 "platforms": ["linux/amd64"], "benchmark_devices": ["x86-gateway"]}
BAD_TRAINING = {**FAST_TRAINING, "epochs": 1, "seed": 7}
DEMO_PLAN = {"stages": [5, 25, 100], "stage_window_s": 20, "ack_timeout_s": 60, "jitter_s": 2,
             "baseline_window_s": 120, "fleet_file": ".run/demo-loop/fleet.yaml",
             "credentials_dir": ".run/demo-loop/mqtt"}  # the demo's fleet, never the project's own fleet.yaml
DRIFT_SETTINGS = {"cooldown_h": 0, "consecutive_windows": 2}
DEMO_CLASSES = ("x86-gateway", "rpi4-8gb")  # every device runs both runtimes here: the class picks the variant


class Timeline:
    def __init__(self) -> None:
        self.started, self.events = time.monotonic(), []

    def __call__(self, what: str) -> None:
        line = f"[{time.monotonic() - self.started:7.1f} s] {what}"
        self.events.append(line)
        print(line, flush=True)


def _ui(path: str) -> str:
    from prefect.settings import PREFECT_UI_URL

    return f"{PREFECT_UI_URL.value()}{path}"


def ensure_champion(params: Params, note: Timeline) -> str:
    """The champion's version; without one, ``make demo``'s candidate becomes it with a recorded bootstrap."""
    from tasks.registry import tracking
    from tasks.registry.promotion import ApprovalRecord, promote, version_by_alias

    tracking.configure(params.mlflow)
    name = params.mlflow.registered_model
    champion = version_by_alias(name, "champion")
    if champion is not None:
        return str(champion.version)
    candidate = version_by_alias(name, "candidate")
    if candidate is None:
        raise SystemExit("error: no registered candidate: run `make demo` first")
    promote(name, str(candidate.version), ApprovalRecord.from_decision(
        True, "demo-loop", "bootstrap: the first champion of the demo fleet"))
    note(f"no champion yet: candidate v{candidate.version} promoted (bootstrap approval recorded)")
    return str(candidate.version)


def start_fleet(fleet: DeviceFleet, params: Params, count: int, release: Release, note: Timeline) -> None:
    """The demo's devices, each serving ``release``'s bundle for its class: half x86 gateways and half Raspberry
    Pis (``DEMO_CLASSES``) when the release chose a variant for both, so the retrain's rollout runs per class;
    otherwise (a version registered before per-class choices) one whole-fleet release."""
    from tasks.rollout.fleet import ACL_FILE, PASSWORD_FILE, ensure_control_plane, simulated_fleet

    settings = params.rollout  # with DEMO_PLAN applied: the fleet and credentials live under RUN_DIR
    classes = DEMO_CLASSES if set(DEMO_CLASSES) <= set(release.classes) else ()
    passwords = simulated_fleet(count, [settings.group], settings.credentials_dir, fleet_file=settings.fleet_file,
                                prefix=PREFIX, classes=classes)
    ensure_control_plane(settings.credentials_dir)
    mosquitto.stop_mosquitto(RUN_DIR)  # a previous demo's broker
    broker = mosquitto.start_mosquitto(RUN_DIR, int(settings.broker.rsplit(":", 1)[1]),
                                       settings.credentials_dir / PASSWORD_FILE, settings.credentials_dir / ACL_FILE)
    note(f"Mosquitto on {broker.host}:{broker.port}: {count} device logins, ACLs per device")
    collected = (REPO_ROOT / params.drift.collected_dir).resolve()
    collected.mkdir(parents=True, exist_ok=True)
    for index, (device, (_, password)) in enumerate(passwords.items()):
        device_class = classes[index % len(classes)] if classes else None
        chosen = release.classes[device_class] if device_class else release
        fleet.start(device, password, Path(chosen.bundle_url.removeprefix("file://")),
                    updater_args=("--device-class", device_class) if device_class else (), upload_to=collected,
                    sample_rate=0.2, sample_file_records=64, sample_file_age_s=5)
    if classes:
        note(f"device classes: {', '.join(f'{c} ({release.classes[c].variant})' for c in classes)}, "
             f"{count // len(classes)}+ devices each: the rollouts go per class")


def note_rollout(note: Timeline, since: float) -> None:
    """The steps of the newest rollout report written since ``since`` (by the retrain's rollout subflow)."""
    reports = [path for path in (REPO_ROOT / "reports" / "rollout").glob("*/report.json")
               if path.stat().st_mtime >= since]
    if not reports:
        note("no rollout report: see the retrain run's logs")
        return
    report = json.loads(max(reports, key=lambda path: path.stat().st_mtime).read_text())
    for step in [*report["stages"], *([report["rollback"]] if report["rollback"] else [])]:
        figures = step.get("figures") or {}
        confidence = figures.get("mean_confidence")
        lane = f" [{step['device_class']}]" if step.get("device_class") else ""
        note(f"  rollout {step['name']:>8}{lane}: {step['action']} {step['version']} -> {len(step['installed'])}/"
             f"{len(step['devices'])} acked" + (f", confidence {confidence:.3f}" if confidence is not None else "")
             + (f"; {'; '.join(step['problems'])}" if step["problems"] else ""))
    note(f"  rollout {report['rollout_id']}: {report['outcome']}" + (f" ({report['reason']})" if report["reason"]
                                                                      else ""))


def run_deployment(name: str, parameters: dict[str, Any], timeout_s: float = 1800):
    from prefect.deployments import run_deployment as run

    return run(name, parameters=parameters, timeout=timeout_s)


def set_retrain_defaults(parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Replace the ``retrain/on-drift`` deployment's default parameters; the previous ones."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import DeploymentUpdate

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("retrain/on-drift")
        previous = dict(deployment.parameters or {})
        client.update_deployment(deployment.id, DeploymentUpdate(parameters=parameters or {}))
    return previous


def _artifact_description(flow_run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
            flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    return next((artifact.description or "" for artifact in artifacts if artifact.key == key), "no artifact")


def _retrain_since(started_after: float):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(deployment_filter=DeploymentFilter(name=DeploymentFilterName(
            any_=["on-drift"])), sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=5)
    return next((run for run in runs if run.created and run.created.timestamp() >= started_after), None)


def drift_until_retrain(note: Timeline, started_after: float, timeout_s: float = 900):
    """A drift check every ~45 s (the devices' uploads of that time are its window) until the policy fires
    and the ``retrain/on-drift`` automation has started a retrain; that run."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(45)
        check = run_deployment("drift-check/hourly", {"settings": DRIFT_SETTINGS}, 600)
        note(f"drift check {check.name}: {check.state.name}: {_artifact_description(check.id, 'drift-check')}")
        for _ in range(15):  # the event reaches the automation within seconds
            if (retrain := _retrain_since(started_after)) is not None:
                return retrain
            time.sleep(2)
    raise SystemExit("error: no retrain run was started by the drift trigger within "
                     f"{timeout_s:g} s; see the drift-check artifacts and the automations in the Prefect UI")


def decide_and_wait(run, interactive: bool, note: Timeline, comment: str):
    from prefect.client.orchestration import get_client

    from tasks.approval import decide

    with get_client(sync_client=True) as client:
        while (state := client.read_flow_run(run.id).state).name not in ("Suspended", "Paused") and \
                not state.is_final():
            time.sleep(5)
        if state.is_final():
            raise SystemExit(f"error: retrain {run.name} ended before the approval gate: {state.message}")
        note(f"retrain {run.name} waits at the approval gate: {_ui(f'/runs/flow-run/{run.id}')}")
        if interactive:
            print("  approve or reject it in the Prefect UI (Resume), or: edgeloop approve "
                  f"{run.name} --reviewer YOU", flush=True)
        else:
            decide(str(run.id), True, "demo-loop", comment)
            note(f"approved by demo-loop: {comment}")
        while not (state := client.read_flow_run(run.id).state).is_final():
            time.sleep(5)
    return state


def demo_params() -> Params:
    """``params.yaml`` with the environment's overrides and the demo's rollout plan (its own fleet and broker)."""
    from flows.rollout import RolloutPlan

    params = load_params(PARAMS_PATH)  # with the environment's overrides (registry, keys, broker, MLflow)
    return params.model_copy(update={"rollout": apply_override(params.rollout, RolloutPlan.model_validate(DEMO_PLAN),
                                                               "the demo's rollout plan")})


def demo_traffic() -> tuple[np.ndarray, np.ndarray]:
    """The devices' inputs: calm (digits the model did not train on) and the same drifted at ``high``."""
    from tasks.data.sources import load_sklearn_digits
    from tasks.monitoring.simulate_drift import DEFAULT_KINDS, shift_all

    digits = load_sklearn_digits()
    calm = digits.x[1200:]
    drifted, _ = shift_all(calm, digits.y[1200:], DEFAULT_KINDS, "high", np.random.default_rng(0))
    return calm, drifted


def roll_out_retrain(retrain, interactive: bool, note: Timeline) -> tuple[str, bool]:
    """Run one's end: the drift retrain approved and rolled out to every device."""
    since = time.time()
    final = decide_and_wait(retrain, interactive, note, "retrained after the drift alarm")
    note(f"retrain {retrain.name}: {final.name} {final.message or ''}")
    note_rollout(note, since)
    return "the retrained version rolled out to every device", final.is_completed() and final.name == "Completed"


def roll_back_bad_challenger(training: dict[str, Any], interactive: bool, note: Timeline) -> tuple[str, bool]:
    """Run two: a bad challenger, approved, rolled back by the canary's health."""
    bad = run_deployment("retrain/on-drift", {"params": {**training, **BAD_TRAINING, "gates": {
        **training["gates"], "min_accuracy": 0.3, "max_accuracy_drop_pts": 60.0}}}, 0)
    note(f"a deliberately bad challenger (1 epoch, gates lowered): retrain {bad.name}")
    since = time.time()
    final = decide_and_wait(bad, interactive, note, "approved on purpose: the canary must catch it")
    note(f"retrain {bad.name}: {final.name} {final.message or ''}")
    note_rollout(note, since)
    return "the bad challenger rolled back automatically", final.name == "Rolled back"


def both_runs(fleet: DeviceFleet, traffic: tuple[np.ndarray, np.ndarray], training: dict[str, Any],
              interactive: bool, note: Timeline) -> list[tuple[str, bool]]:
    """Drift -> retrain -> approval -> canary -> everyone, then a bad challenger rolled back; what happened.

    ``traffic`` is :func:`demo_traffic`'s calm and drifted inputs.
    """
    calm, drifted = traffic
    with fleet.traffic(drifted, rate_per_device_hz=2.0):
        note("traffic drifts (noise, blur, brightness: high); devices sample and upload it")
        retrain = drift_until_retrain(note, time.time())
    note(f"edgeloop.drift.detected -> retrain {retrain.name}: {_ui(f'/runs/flow-run/{retrain.id}')}")
    with fleet.traffic(calm, rate_per_device_hz=2.0):  # the cause is fixed on site; the fleet serves on
        note("traffic back to normal while the retrain runs (the rollout's baseline: the champion on it)")
        outcomes = [roll_out_retrain(retrain, interactive, note)]
        outcomes.append(roll_back_bad_challenger(training, interactive, note))
    versions = fleet.versions()
    note(f"devices now serve: {json.dumps({v: list(versions.values()).count(v) for v in set(versions.values())})}")
    return outcomes


def report(note: Timeline, params: Params, outcomes: list[tuple[str, bool]]) -> int:
    """Print the timeline, where to look and each expected outcome; the exit code."""
    print("\nTimeline:\n" + "\n".join(note.events))
    print(f"\nPrefect UI: {_ui('/runs')}\nMLflow UI:  {params.mlflow.tracking_uri} (registry: "
          f"{params.mlflow.registered_model}; rollout runs in experiment edgeloop-rollout)")
    print(f"Rollout reports and timeline charts: {REPO_ROOT / 'reports' / 'rollout'}")
    for what, happened in outcomes:
        print(f"{'ok' if happened else 'NOT AS EXPECTED'}: {what}")
    return 0 if all(happened for _, happened in outcomes) else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=20)
    parser.add_argument("--interactive", action="store_true", help="approve in the Prefect UI yourself")
    parser.add_argument("--keep", action="store_true", help="leave the devices and the broker running")
    args = parser.parse_args(argv)
    from tasks.rollout.records import release_of

    note = Timeline()
    params = demo_params()
    champion = ensure_champion(params, note)
    release = release_of(params, champion)
    # telemetry every 5 s, 2 requests/s per device: 20 devices leave this machine room for the retrain and
    # the packaging gates (an image's cold start is measured on the same cores)
    fleet = DeviceFleet(RUN_DIR / "devices", params.rollout.broker, params.rollout.group, params.package.public_keys,
                        telemetry_interval_s=5.0)
    traffic = demo_traffic()
    training = default_parameters().model_dump(mode="json")
    previous_defaults = set_retrain_defaults({"params": {**training, **FAST_TRAINING}, "rollout_plan": DEMO_PLAN})
    try:
        start_fleet(fleet, params, args.devices, release, note)
        note(f"{len(fleet.devices)} devices serve champion v{champion} (updater + edge service each)")
        outcomes = both_runs(fleet, traffic, training, args.interactive, note)
    finally:
        try:
            set_retrain_defaults(previous_defaults)
        finally:  # devices and broker go even when the Prefect server does not answer
            if not args.keep:
                try:
                    fleet.stop()
                finally:
                    mosquitto.stop_mosquitto(RUN_DIR)
    return report(note, params, outcomes)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ServiceError, EdgeloopError) as error:  # a missing broker binary, an unreachable server, bad params
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
