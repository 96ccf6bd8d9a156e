"""The ``rollout`` flow end to end across a network: a real Mosquitto on mutual TLS (fleet-CA certificates as the
logins, per-device ACLs), simulated devices enrolled with kits, each on a host of its own (a Linux network
namespace) running the real edge service and updater with its own store and serving real traffic, bundles
fetched and samples uploaded over HTTPS with client certificates, a real MLflow registry (SQLite) and the
session's Prefect server.

One scenario, in order (each phase starts from where the last one left the fleet):

1. a healthy version goes out canary -> 50% -> 100% while the broker is stopped in the middle (the rollout
   pauses and resumes); the device that never comes online is named, the others all serve the new version;
2. a bad challenger (same predictions, far lower confidence) is promoted and rolled out: the canary's
   telemetry trips the confidence limit, every updated device returns to the previous version, the version
   is tagged ``rollout=rolled-back`` with the reason and ``champion`` goes back.
"""

from __future__ import annotations

import contextvars
import json
import threading
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_system_tools
from tests.registry_helpers import TEST, prepare_run, sqlite_tracking
from tests.stack_helpers import wait_for

pytestmark = pytest.mark.integration
GROUP = "lab"
RUNNING = ["sim-0", "sim-1", "sim-2", "sim-3"]
SILENT = "sim-4"  # enrolled (in the fleet file and the ACL), never started


def _softened(model, factor: float):
    """The same network with its logits scaled down: identical predictions, much lower confidence."""
    import tf_keras as keras

    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    kernel, bias = clone.layers[-1].get_weights()
    clone.layers[-1].set_weights([kernel * factor, bias * factor])
    return clone


@pytest.fixture(scope="module")
def registry(stack, tmp_path_factory, tiny_model, tiny_model_files, digits):
    """Versions 1 (int8, champion), 2 (fp32: healthy) and 3 (int8, under-confident) in a SQLite MLflow.

    After the session's ``stack``: the environment it sets is what this fixture saves and puts back (set up
    first, it would remove the stack's MLFLOW_TRACKING_URI for every later test of the worker)."""
    import mlflow

    from tasks.config import Params
    from tasks.contracts import Workspace
    from tasks.model import exporters
    from tasks.registry.register import register

    root = tmp_path_factory.mktemp("rollout-registry")
    bad = root / "bad_int8.tflite"
    bad.write_bytes(exporters.tflite_bytes(_softened(tiny_model, 0.15), "int8", digits.x[:50]))
    with sqlite_tracking(root) as tracking_uri:
        params = Params.model_validate({"drift": {"reference_rows": 100},
                                        "retrain": {"labelled_dir": str(root / "none")},
                                        "mlflow": {"tracking_uri": tracking_uri},  # the flow's too
                                        "evaluate": {"latency_warmup_runs": 1, "latency_runs": 5}})
        for index, (variant, model_file) in enumerate([("tflite_int8", tiny_model_files["tflite_int8"]),
                                                       ("tflite_fp32", tiny_model_files["tflite_fp32"]),
                                                       ("tflite_int8", bad)]):
            workspace = Workspace(root / f"run{index}")
            register(params, workspace, *prepare_run(workspace, digits, model_file, variant, TEST))
        client = mlflow.MlflowClient()
        client.set_registered_model_alias(params.mlflow.registered_model, "champion", "1")
        yield params


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, image_env, registry, digits):
    """Four running devices, each in a network namespace of its own (a host on a test network), enrolled with
    the fleet CA and provisioned with version 1; the broker (mutual TLS) and the ingest/bundle service (HTTPS,
    client certificates) on this machine's address on that network, the control plane's certificate its login.
    Every fleet link crosses the network, none is loopback."""
    from scripts.device_fleet import DeviceFleet
    from tasks.rollout import fleet as fleet_files
    from tasks.rollout import fleet_ca
    from tasks.rollout.broker import TlsFiles
    from tasks.rollout.records import release_of
    from tasks.stack import mosquitto, services
    from tests.netns_helpers import Network
    from tests.tls_helpers import start_tls_ingest

    require_system_tools("mosquitto", packages="mosquitto")
    root = tmp_path_factory.mktemp("rollout-fleet")
    credentials, bundles = root / "credentials", root / "bundles"
    with Network(RUNNING) as network:
        here = network.bridge_address
        ca = fleet_ca.init_ca(root / "fleet-ca")
        broker_files = fleet_ca.issue_server(ca, "broker", [here])
        fleet_ca.issue_server(ca, "ingest", [here])
        bundles.mkdir()
        devices = DeviceFleet(root / "devices", "", GROUP, image_env.public_keys)
        try:
            ingest = start_tls_ingest(root / "run", ca, bundles, root / "collected", host=here)
            port = services.free_port()
            kits = {device: fleet_files.enroll_device(
                credentials / "fleet.yaml", credentials, ca.root, device, GROUP, root / "kits" / device,
                broker=f"{here}:{port}", ingest_url=f"{ingest}/v1/ingest",
                public_keys=sorted(image_env.public_keys.glob("*.pub"))) for device in [*RUNNING, SILENT]}
            broker = mosquitto.start_mosquitto(root / "run", port, None, credentials / fleet_files.ACL_FILE,
                                               host=here, tls=TlsFiles(ca.certificate_path, broker_files.certificate,
                                                                       broker_files.key, ca.crl_path))
            settings = {"broker": broker.address, "fleet_file": str(credentials / "fleet.yaml"),
                        "credentials_dir": str(credentials), "bundle_dir": str(bundles), "broker_tls": True,
                        "fleet_ca_dir": str(ca.root), "bundle_base_url": f"{ingest}/v1/bundles/"}
            with_keys = registry.model_copy(update={
                "package": registry.package.model_copy(update={"signing_key": image_env.signing_key}),
                "rollout": registry.rollout.model_copy(update={"bundle_dir": bundles})})
            first = release_of(with_keys, "1")  # provisioned like a factory image; the flow reuses the same bundle
            for device in RUNNING:  # each on its own host, knowing the fleet only from its kit
                host = network.hosts[device]
                devices.start(device, None, Path(first.bundle_url.removeprefix("file://")), kit=kits[device],
                              netns=host.namespace, address=host.address)
            wait_for(lambda: set(devices.versions().values()) == {"v1"}, 60, "every device to serve v1")
            with devices.traffic(digits.x[1200:1500], rate_per_device_hz=8.0):
                yield devices, broker, root, settings
        finally:
            try:
                devices.stop()
            finally:  # the servers go even when a device would not stop
                mosquitto.stop_mosquitto(root / "run")
                services.stop("ingest", root / "run")


def _plan(settings: dict, **changes):
    from flows.rollout import RolloutPlan

    # a stage's figures pool a few dozen requests per device here: the limits leave room for that sampling
    # noise (the bad challenger's confidence is ~0.5 below, its latency the same). Latency is live timing on a
    # possibly busy host, so no healthy run may trip its limit: only a p95 a minute above the baseline would
    # (requests time out after 10 s), and only the deliberate confidence drop rolls back.
    return RolloutPlan.model_validate({"group": GROUP, "stages": [25, 50, 100], "stage_window_s": 3,
                                       "ack_timeout_s": 10, "jitter_s": 0.5, "max_missing_fraction": 0.5,
                                       "baseline_window_s": 30, "max_confidence_drop": 0.2,
                                       "min_p95_increase_ms": 60_000, **settings, **changes})


def _active(device) -> str | None:
    state = json.loads((device.store / "state.json").read_text())
    return state.get("active")


def _artifact_of(flow_run_id, key: str) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(
            any_=[flow_run_id])))
    return next(artifact.data for artifact in artifacts if artifact.key == key)


def _connected_to_the_broker(port: int) -> bool:
    """Whether this process (the rollout's channel runs in it) still holds a TCP connection to the broker.

    Read from the kernel (psutil), not from log records: Prefect's logging set-up replaces the root
    handlers (pytest's caplog among them) when the first flow of a session runs.
    """
    import psutil

    return any(connection.raddr and connection.raddr.port == port
               and connection.status in (psutil.CONN_ESTABLISHED, psutil.CONN_CLOSE_WAIT)
               for connection in psutil.Process().net_connections(kind="tcp"))


def test_healthy_rollout_rides_out_a_broker_stop_then_a_bad_challenger_is_rolled_back(stack, fleet, registry,
                                                                                      tmp_path):
    import mlflow

    from flows.rollout import rollout
    from tasks.stack import mosquitto
    devices, broker, root, settings = fleet
    client, name = mlflow.MlflowClient(), registry.mlflow.registered_model
    wait_for(lambda: all(d.requests > 20 for d in devices.devices.values()), 30, "baseline traffic on v1")

    # ---- 1: version 2, healthy; the broker stops after the canary and comes back -------------------------
    result: dict = {}
    # in this context: the stack's Prefect settings are a context variable, and a bare thread would see the
    # settings Prefect read when first imported (a run once went to a temporary server of its own that way)
    runner = threading.Thread(target=contextvars.copy_context().run, args=(lambda: result.update(state=rollout(
        version="2", plan=_plan(settings), report_dir=str(tmp_path / "reports"), return_state=True)),))
    runner.start()
    wait_for(lambda: any(_active(d) == "v2" for d in devices.devices.values()), 60, "the canary to install v2")
    mosquitto.stop_mosquitto(root / "run")  # SIGTERM: the broker saves its state, as in a planned restart
    # The rollout is in its canary now and cannot leave it without the broker (the canary's acknowledgements
    # and telemetry, or the next stage's PUBACK arrive through it), so once its channel has noticed the loss,
    # the rollout is paused on the outage (its socket is closed). Restarting soon after stays within the stage's
    # ack_timeout_s.
    wait_for(lambda: not _connected_to_the_broker(broker.port), 30,
             "the rollout's channel to notice the broker stop", interval_s=0.05)
    mosquitto.restart_mosquitto(root / "run", broker)
    runner.join(240)
    assert not runner.is_alive(), "the rollout did not finish after the broker came back"
    state = result["state"]
    report = state.result()
    assert report["outcome"] == "completed", report["reason"]
    assert [stage["name"] for stage in report["stages"]] == ["canary", "50%", "100%"]
    assert [len(stage["devices"]) for stage in report["stages"]] == [2, 3, 5]  # ceil(5 x 25%), ...
    assert report["stages"][-1]["missing"] == [SILENT]  # named, and the rollout did not wait forever
    assert sorted(report["stages"][-1]["installed"]) == RUNNING
    assert all(stage["figures"]["requests"] > 0 for stage in report["stages"])  # health was judged on traffic
    assert {_active(d) for d in devices.devices.values()} == {"v2"}
    wait_for(lambda: set(devices.versions().values()) == {"v2"}, 30, "every service to serve v2")
    tags = client.get_model_version(name, "2").tags
    assert tags["rollout"] == "completed" and "4/5 installed" in tags["rollout.step.100pct"]
    assert "| 100% |" in _artifact_of(state.state_details.flow_run_id, "rollout")
    assert "**in progress**" in _artifact_of(state.state_details.flow_run_id, "rollout-progress")  # step by step
    folder = tmp_path / "reports" / report["rollout_id"]
    assert (folder / "timeline.png").stat().st_size > 0 and json.loads((folder / "report.json").read_text())

    # ---- 2: version 3 approved as champion, but under-confident on the devices: rolled back ---------------
    client.set_registered_model_alias(name, "previous", "2")  # what promotion does after an approval
    client.set_registered_model_alias(name, "champion", "3")
    errors_before = sum(d.errors for d in devices.devices.values())
    bad = rollout(version=None, plan=_plan(settings, stage_window_s=20), report_dir=str(tmp_path / "reports"))
    assert bad["outcome"] == "rolled_back" and bad["target"] == "v3" and bad["previous"] == "v2"
    canary = bad["stages"][0]
    assert len(bad["stages"]) == 1 and "mean confidence" in canary["problems"][0], canary
    assert canary["figures"]["mean_confidence"] < canary["baseline"]["mean_confidence"] - 0.2
    rollback = bad["rollback"]
    assert rollback["action"] == "rollback" and sorted(rollback["installed"]) == sorted(canary["installed"])
    assert {_active(d) for d in devices.devices.values()} == {"v2"}
    wait_for(lambda: set(devices.versions().values()) == {"v2"}, 30, "every service to serve v2 again")
    for device_id in canary["installed"]:
        state_file = json.loads((devices.devices[device_id].store / "state.json").read_text())
        assert "mean confidence" in state_file["rolled_back"]["v3"]
    tags = client.get_model_version(name, "3").tags
    assert tags["rollout"] == "rolled-back" and "mean confidence" in tags["rollout.reason"]
    aliases = client.get_registered_model(name).aliases
    assert str(aliases["champion"]) == "2" and "previous" not in aliases
    assert sum(d.errors for d in devices.devices.values()) == errors_before  # no request failed on the way
    assert np.isfinite(canary["figures"]["p95_ms"])
