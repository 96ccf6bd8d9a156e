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
import textwrap
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT
from tests.mlflow_smoke import smoke_flow

pytestmark = pytest.mark.integration

CLIENT = smoke_flow("postgres-smoke", "pg-model", "logged through the tracking server's artifact proxy")


def _query(server, database: str, sql: str) -> list[tuple]:
    from tasks.stack.postgres import connect

    connection = connect(server, database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return cursor.fetchall()
    finally:
        connection.close()


def _client_env(home: Path, prefect_port: int, mlflow_port: int) -> dict[str, str]:
    """A host with the two URLs and nothing else of the control plane."""
    return {"PATH": os.environ["PATH"], "HOME": str(home), "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}"}


def test_state_in_postgres_survives_a_restart_and_a_backup_restored_into_a_fresh_control_plane(shared_postgres,
                                                                                               tmp_path):
    import json

    from tasks.stack import services
    from tasks.stack.processes import stop

    server, run_dir = shared_postgres.fresh(), tmp_path / "run"
    prefect_port, mlflow_port = services.free_port(), services.free_port()
    try:
        started = services.up(run_dir, prefect_port, mlflow_port, schedules=False, database=server)
        assert [service.name for service in started] == ["prefect-server", "mlflow-server", "prefect-worker"]
        client_dir = tmp_path / "client"
        client_dir.mkdir()
        done = subprocess.run([sys.executable, "-c", CLIENT], cwd=client_dir, env=_client_env(
            client_dir, prefect_port, mlflow_port), capture_output=True, text=True, timeout=300)
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

        services.down(run_dir)
        shared_postgres.restart()  # what was stored must come back with the server
        assert _query(server, "mlflow", versions) == [("pg-model", int(logged["version"]))]
        assert ("postgres-smoke", "COMPLETED") in _query(server, "prefect", "SELECT f.name, r.state_type FROM "
                                                         "flow_run r JOIN flow f ON f.id = r.flow_id")
        _backup_and_restore(shared_postgres, server, run_dir, tmp_path, logged)
    finally:
        for name in ("prefect-worker", "mlflow-server", "prefect-server", "prefect-services", "redis"):
            stop(name, run_dir)


READER = textwrap.dedent('''
    import json, tempfile
    from pathlib import Path

    import mlflow
    from prefect.client.orchestration import get_client

    client = mlflow.MlflowClient()
    versions = [(v.name, v.version, v.run_id) for v in client.search_model_versions("name='pg-model'")]
    run_id = versions[0][2]
    artifact = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="evidence.txt",
                                                        dst_path=tempfile.mkdtemp())).read_text()
    with get_client(sync_client=True) as prefect:
        runs = sorted((prefect.read_flow(r.flow_id).name, r.state.type.value, str(r.id))
                      for r in prefect.read_flow_runs())
    print(json.dumps({"versions": versions, "artifact": artifact, "runs": runs}))
''')


def _services_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tasks.cli", "services", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=600)


def _read_back(prefect_port: int, mlflow_port: int, home: Path) -> dict:
    import json

    home.mkdir()
    done = subprocess.run([sys.executable, "-c", READER], cwd=home, env=_client_env(home, prefect_port, mlflow_port),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _backup_and_restore(shared_postgres, server, run_dir: Path, tmp_path: Path, logged: dict) -> None:
    """One command backs the control plane up; one restores it into fresh databases and a fresh run folder, where
    the same model versions (with their artifact, served) and the same flow-run history are found. A damaged
    backup and an occupied target are refused before anything is written."""
    from tasks.stack import services

    url, saved = shared_postgres.server.url, tmp_path / "backups" / "nightly"
    remote = tmp_path / "dvc-remote"  # the DVC remote's folder on the control host
    (remote / "files" / "md5" / "ab").mkdir(parents=True)
    (remote / "files" / "md5" / "ab" / "cdef").write_bytes(b"a data version")
    made = _services_cli("backup", "--run-dir", str(run_dir), "--database-url", url, "--database-prefix",
                         server.prefix, "--to", str(saved), "--dvc-remote", str(remote))
    assert made.returncode == 0, made.stderr
    assert '"model_versions": 1' in made.stdout and url.split("@")[0].split(":")[-1] not in made.stdout
    assert sorted(path.name for path in saved.iterdir()) == ["artifacts.tar.gz", "dvc-remote.tar.gz", "manifest.json",
                                                             "mlflow.dump", "prefect.dump"]
    assert _services_cli("backup", "--run-dir", str(run_dir), "--database-url", url, "--database-prefix",
                         server.prefix, "--to", str(saved)).stderr.startswith(f"error: {saved} already exists")

    damaged = tmp_path / "backups" / "damaged"
    shutil.copytree(saved, damaged)
    blob = bytearray((damaged / "mlflow.dump").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (damaged / "mlflow.dump").write_bytes(bytes(blob))
    untouched, untouched_dir = shared_postgres.fresh(), tmp_path / "untouched"
    refused = _services_cli("restore", "--run-dir", str(untouched_dir), "--database-url", url, "--database-prefix",
                            untouched.prefix, "--from", str(damaged))
    assert refused.returncode == 1 and "mlflow.dump does not match its checksum" in refused.stderr, refused.stderr
    assert _query(untouched, "prefect", "SELECT count(*) FROM information_schema.tables WHERE "
                  "table_schema = 'public'") == [(0,)] and not untouched_dir.exists()

    fresh, fresh_dir = shared_postgres.fresh(), tmp_path / "restored"
    no_remote = _services_cli("restore", "--run-dir", str(fresh_dir), "--database-url", url, "--database-prefix",
                              fresh.prefix, "--from", str(saved))
    assert no_remote.returncode == 1 and "--dvc-remote" in no_remote.stderr  # refused before anything is written
    done = _services_cli("restore", "--run-dir", str(fresh_dir), "--database-url", url, "--database-prefix",
                         fresh.prefix, "--from", str(saved), "--dvc-remote", str(tmp_path / "dvc-restored"))
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "dvc-restored" / "files" / "md5" / "ab" / "cdef").read_bytes() == b"a data version"
    again = _services_cli("restore", "--run-dir", str(fresh_dir), "--database-url", url, "--database-prefix",
                          fresh.prefix, "--from", str(saved), "--dvc-remote", str(tmp_path / "dvc-again"))
    assert again.returncode == 1 and "already hold data" in again.stderr, again.stderr

    history = "SELECT f.name, r.state_type, r.id::text FROM flow_run r JOIN flow f ON f.id = r.flow_id ORDER BY 3"
    assert _query(fresh, "prefect", history) == _query(server, "prefect", history)
    prefect_port, mlflow_port = services.free_port(), services.free_port()
    try:
        services.start_prefect(fresh_dir, prefect_port, schedules=False, database=fresh)  # no worker: reads only
        services.start_mlflow(fresh_dir, mlflow_port, fresh)
        after = _read_back(prefect_port, mlflow_port, tmp_path / "reader")
    finally:
        services.down(fresh_dir)
    assert [tuple(version) for version in after["versions"]] == [("pg-model", logged["version"], logged["run_id"])]
    assert "artifact proxy" in after["artifact"]  # the artifact came back, served by the restored MLflow
    assert sorted(tuple(run) for run in after["runs"]) == sorted(_query(server, "prefect", history))


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
