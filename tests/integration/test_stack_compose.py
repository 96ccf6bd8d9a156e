"""The compose control plane (docker/compose.control-plane.yml) brought up for real, on the project's Docker engine,
with every image built here with no hub (``edgeloop base-images --control-plane``): PostgreSQL, Redis, the
one-shot migration, the Prefect API and its loop services, MLflow, Mosquitto, the registry and Prometheus. A
worker on this host (as on any other) runs a flow against it that logs a run with an artifact and registers a
model version; the version is then read from PostgreSQL inside the stack and the artifact through MLflow's proxy,
the run's events from what the loop services persisted; ``down -v`` leaves no volume behind.

(Named to run after most integration tests: on a machine's first run ``make test``'s warm-up builds these images
beside the earlier tests instead of this test waiting for them.)
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx
import pytest

from tests.conftest import REPO_ROOT, compose
from tests.mlflow_smoke import smoke_flow

pytestmark = pytest.mark.integration
FILES = ["-f", "docker/compose.control-plane.yml"]

SMOKE = smoke_flow("compose-smoke", "compose-model", "served by the compose stack's MLflow")


def _wait(check, service: str, env: dict[str, str], project: str, timeout_s: float = 240.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if check():
                return
        except (httpx.HTTPError, OSError):
            pass  # not answering yet: the loop below waits and asks again
        if time.monotonic() > deadline:
            logs = compose([*FILES, "logs", "--no-color", "--tail", "40", service], env, project).stdout
            pytest.fail(f"{service} did not come up within {timeout_s:.0f} s:\n{logs}")
        time.sleep(1)


def _ok(url: str) -> bool:
    return httpx.get(url, timeout=3).status_code == 200


def _mosquitto_answers(port: int, tls) -> bool:
    """Whether the broker takes an MQTT session over mutual TLS with the control plane's certificate."""
    import paho.mqtt.client as mqtt

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="control-plane", protocol=mqtt.MQTTv5)
    client.tls_set_context(tls.context())
    accepted: list = []
    client.on_connect = lambda _c, _u, _flags, code, _p: accepted.append(not code.is_failure)
    try:
        client.connect("127.0.0.1", port, keepalive=5)
        for _ in range(20):
            client.loop(timeout=0.1)
        return accepted == [True]
    finally:
        client.disconnect()


def _persisted_events(client, flow_run_id) -> int:
    from prefect.events.filters import EventFilter, EventResourceFilter

    page = client.request("POST", "/events/filter", json={"filter": EventFilter(
        resource=EventResourceFilter(id=[f"prefect.flow-run.{flow_run_id}"])).model_dump(mode="json")})
    return len(page.json()["events"])


def test_the_compose_control_plane_comes_up_runs_a_flow_and_leaves_nothing_behind(images, tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from tasks.packaging.control_plane_images import ensure_control_plane_images
    from tasks.packaging.docker_client import connect
    from tasks.rollout import fleet, fleet_ca
    from tasks.stack import services
    from tasks.stack.prefect_admin import CRASH_AUTOMATION
    from tasks.stack.processes import stop

    engine = connect()
    try:
        settings = ensure_control_plane_images(engine)
    finally:
        engine.close()
    ca = fleet_ca.init_ca(tmp_path / "fleet-ca")  # what `edgeloop fleet ca init` and `fleet server-cert` write
    fleet_ca.issue_server(ca, "broker", ["127.0.0.1"])
    credentials = tmp_path / "mqtt"
    fleet.write_acl(fleet.Fleet(), credentials)  # the control plane's rule; devices come with `fleet enroll`
    ports = {name: services.free_port() for name in ("PREFECT", "MLFLOW", "MQTT", "REGISTRY", "PROMETHEUS")}
    env = {**settings, "POSTGRES_PASSWORD": "compose-secret", "REDIS_PASSWORD": "bus-secret",
           "EDGELOOP_BIND": "127.0.0.1", "EDGELOOP_BROKER_CREDENTIALS": str(credentials),
           "EDGELOOP_FLEET_CA": str(ca.root),
           "PREFECT_UI_API_URL": f"http://127.0.0.1:{ports['PREFECT']}/api",
           **{f"EDGELOOP_{name}_PORT": str(port) for name, port in ports.items()}}
    project, run_dir = f"edgeloop-cp-{ports['PREFECT']}", tmp_path / "worker"
    api, mlflow_url = f"http://127.0.0.1:{ports['PREFECT']}/api", f"http://127.0.0.1:{ports['MLFLOW']}"
    try:
        up = compose([*FILES, "up", "-d"], env, project, timeout_s=600)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        checks = {"prefect-server": lambda: _ok(f"{api}/health"), "mlflow": lambda: _ok(f"{mlflow_url}/health"),
                  "registry": lambda: _ok(f"http://127.0.0.1:{ports['REGISTRY']}/v2/"),
                  "prometheus": lambda: _ok(f"http://127.0.0.1:{ports['PROMETHEUS']}/-/healthy"),
                  "mosquitto": lambda: _mosquitto_answers(ports["MQTT"], fleet.control_plane_tls(ca.root))}
        for service, check in checks.items():
            _wait(check, service, env, project)

        setup = subprocess.run([sys.executable, "-m", "tasks.cli", "services", "automations", "--api-url", api],
                               cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert setup.returncode == 0, setup.stderr
        flow_dir = tmp_path / "flow"
        flow_dir.mkdir()
        (flow_dir / "smoke.py").write_text(SMOKE)
        services.start_worker(run_dir, ports["PREFECT"], mlflow_url, services.WORK_POOL)
        with temporary_settings(updates={PREFECT_API_URL: api}), get_client(sync_client=True) as client:
            client.create_deployment(client.create_flow_from_name("compose-smoke"), "compose", path=str(flow_dir),
                                     work_pool_name=services.WORK_POOL, entrypoint="smoke.py:smoke", pull_steps=[
                                         {"prefect.deployments.steps.set_working_directory":
                                          {"directory": str(flow_dir)}}])
            run = run_deployment("compose-smoke/compose", timeout=300, poll_interval=1)
            assert run.state.is_completed(), run.state.message
            assert [automation.name for automation in client.read_automations()] == [CRASH_AUTOMATION]
            # the run's events went API -> Redis -> the loop services' event persister -> PostgreSQL
            _wait(lambda: _persisted_events(client, run.id) >= 3, "prefect-services", env, project, 60)

        import mlflow

        client = mlflow.MlflowClient(tracking_uri=mlflow_url)
        [registered] = client.search_model_versions("name='compose-model'")
        stored = compose([*FILES, "exec", "-T", "-e", "PGPASSWORD=compose-secret", "postgres", "psql", "-h",
                          "127.0.0.1", "-U", "edgeloop", "-d", "mlflow", "-At", "-c",
                          "SELECT name, version, run_id FROM model_versions"], env, project)
        assert stored.stdout.strip() == f"compose-model|{registered.version}|{registered.run_id}", \
            stored.stdout + stored.stderr
        artifact = mlflow.artifacts.download_artifacts(run_id=registered.run_id, artifact_path="evidence.txt",
                                                       dst_path=str(tmp_path / "got"), tracking_uri=mlflow_url)
        assert "compose stack's MLflow" in open(artifact).read()

        logs = {service: compose([*FILES, "logs", "--no-color", service], env, project).stdout
                for service in ("prefect-migrate", "prefect-server")}
        assert "Migrations succeeded" in logs["prefect-migrate"], logs["prefect-migrate"][-1000:]
        assert "migrat" not in logs["prefect-server"].lower()  # the API never migrates: the one-shot did, once
    finally:
        stop("prefect-worker", run_dir)
        down = compose([*FILES, "down", "-v", "--remove-orphans"], env, project, timeout_s=300)
    assert down.returncode == 0, down.stderr[-2000:]
    left = subprocess.run(["docker", "volume", "ls", "-q", "--filter", f"label=com.docker.compose.project={project}"],
                          capture_output=True, text=True, timeout=60)
    assert left.returncode == 0 and left.stdout.strip() == "", left.stdout
    with socket.socket() as probe:  # nothing listens on its ports any more
        assert probe.connect_ex(("127.0.0.1", ports["PREFECT"])) != 0
