"""The team control plane's store: Debian's PostgreSQL started by the project's stack, Prefect and MLflow on it.

A client that knows only the two URLs (as a worker on another host would) runs a flow and logs a run with an
artifact and a model version; the state is then read back from PostgreSQL itself, the artifact from the
folder MLflow serves, and it all survives a restart of the database. A database that does not answer stops
``edgeloop services up`` with one ``error:`` line naming it (password hidden) before anything starts.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, skip_unless_ci

pytestmark = pytest.mark.integration

CLIENT = textwrap.dedent('''
    import json, sys
    from pathlib import Path

    import mlflow
    from prefect import flow

    @flow(name="postgres-smoke")
    def smoke() -> str:
        client = mlflow.MlflowClient()
        with mlflow.start_run() as run:
            mlflow.log_metric("accuracy", 0.97)
            Path("evidence.txt").write_text("logged through the tracking server's artifact proxy")
            mlflow.log_artifact("evidence.txt")
        client.create_registered_model("pg-model")
        version = client.create_model_version("pg-model", f"{run.info.artifact_uri}/evidence.txt", run.info.run_id)
        return json.dumps({"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri,
                           "version": version.version})

    print(smoke())
''')


@pytest.fixture(scope="module")
def postgres():
    """Our PostgreSQL on a free port, its data in a folder the server's account can reach (not pytest's 0700 one)."""
    from tasks.stack import postgres as pg
    from tasks.stack.processes import ServiceError, stop
    from tasks.stack.services import free_port

    try:
        pg._binaries()
    except ServiceError as error:
        skip_unless_ci(str(error))
    root = Path(tempfile.mkdtemp(prefix="edgeloop-pg-"))
    root.chmod(0o755)
    run_dir = root / "run"
    port = free_port()
    server = pg.start_postgres(run_dir, port, root / "postgres")
    yield server, run_dir, port, root
    stop("postgres", run_dir)
    shutil.rmtree(root, ignore_errors=True)


def _query(server, database: str, sql: str) -> list[tuple]:
    from tasks.stack.postgres import connect

    connection = connect(server, database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        connection.close()


def test_prefect_and_mlflow_keep_their_state_in_postgres(postgres, tmp_path):
    import json

    from tasks.stack import services
    from tasks.stack.postgres import start_postgres
    from tasks.stack.processes import stop

    server, run_dir, port, root = postgres
    prefect_port, mlflow_port = services.free_port(), services.free_port()
    try:
        started = services.up(run_dir, prefect_port, mlflow_port, schedules=False, database=server)
        assert [service.name for service in started] == ["prefect-server", "mlflow-server", "prefect-worker"]
        client_dir = tmp_path / "client"  # a host with the two URLs and nothing else of the control plane
        client_dir.mkdir()
        env = {"PATH": os.environ["PATH"], "HOME": str(client_dir), "PREFECT_HOME": str(client_dir / "prefect"),
               "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
               "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}
        done = subprocess.run([sys.executable, "-c", CLIENT], cwd=client_dir, env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        logged = json.loads(done.stdout.strip().splitlines()[-1])

        assert logged["artifact_uri"].startswith("mlflow-artifacts:/")  # served by MLflow, no shared folder
        served = list((run_dir / "mlflow" / "artifacts").rglob("evidence.txt"))
        assert len(served) == 1 and "artifact proxy" in served[0].read_text()
        runs = _query(server, "prefect", "SELECT f.name, r.state_type FROM flow_run r JOIN flow f ON f.id = r.flow_id")
        assert ("postgres-smoke", "COMPLETED") in runs
        assert _query(server, "mlflow", f"SELECT status FROM runs WHERE run_uuid = '{logged['run_id']}'") == [
            ("FINISHED",)]
        versions = "SELECT name, version FROM model_versions"
        assert _query(server, "mlflow", versions) == [("pg-model", int(logged["version"]))]
        assert _query(server, "prefect", "SELECT name FROM work_pool WHERE name = 'edgeloop-process'")

        services.down(run_dir)  # the database too: what was stored must come back with it
        assert not (run_dir / "postgres.pid").exists()
        restarted = start_postgres(run_dir, port, root / "postgres")
        assert _query(restarted, "mlflow", versions) == [("pg-model", int(logged["version"]))]
        assert ("postgres-smoke", "COMPLETED") in _query(restarted, "prefect", "SELECT f.name, r.state_type FROM "
                                                         "flow_run r JOIN flow f ON f.id = r.flow_id")
    finally:
        for name in ("prefect-worker", "mlflow-server", "prefect-server"):
            stop(name, run_dir)


def test_a_database_that_does_not_answer_stops_up_with_one_line_and_starts_nothing(tmp_path):
    from tasks.stack.services import free_port

    dead = free_port()
    url = f"postgresql://edgeloop:s3cret-value@127.0.0.1:{dead}"
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "services", "up", "--run-dir", str(tmp_path / "run"),
                           "--database-url", url, "--prefect-port", str(free_port()), "--mlflow-port",
                           str(free_port())], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    errors = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: PostgreSQL at postgresql://edgeloop:***@127.0.0.1:"), \
        done.stderr
    assert f":{dead}" in errors[0] and "s3cret-value" not in done.stdout + done.stderr
    assert "edgeloop services up --database postgres" in errors[0]
    assert not list((tmp_path / "run").glob("*.pid"))  # neither Prefect nor MLflow was started

    bad = subprocess.run([sys.executable, "-m", "tasks.cli", "services", "up", "--run-dir", str(tmp_path / "run"),
                          "--database-url", "mysql://root@db:3306"], cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: --database-url must be postgresql://"), bad.stderr
