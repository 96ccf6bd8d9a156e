"""Back up and restore a team control plane in one command each: both databases, MLflow's artifacts, the DVC remote.

    edgeloop services backup  --to /backups/2026-12-07 [--database postgres | --database-url URL] [--dvc-remote DIR]
    edgeloop services restore --from /backups/2026-12-07 [--database ... ] [--dvc-remote DIR] [--force]

A backup is a folder: ``prefect.dump`` and ``mlflow.dump`` (``pg_dump`` custom format, PostgreSQL's own),
``artifacts.tar.gz`` (the folder MLflow serves), ``dvc-remote.tar.gz`` when a DVC remote folder is named,
and ``manifest.json`` with every file's sha256 and what was in it (flow runs, model versions). It is written
beside its destination and renamed into place at the end, so an interrupted backup leaves no folder that
looks whole. A restore checks every checksum before it touches anything, refuses databases that already
hold tables (``--force`` replaces them) and services that still run on them, and restores the artifacts
and the DVC remote into empty folders only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from tasks.stack.postgres import DATABASES, Postgres, connect, ensure_databases, tool
from tasks.stack.processes import ServiceError

FORMAT = 1
COUNTS = {"prefect": {"flow_runs": "SELECT count(*) FROM flow_run", "deployments": "SELECT count(*) FROM deployment"},
          "mlflow": {"runs": "SELECT count(*) FROM runs", "model_versions": "SELECT count(*) FROM model_versions"}}


def _client_args(server: Postgres, database: str) -> tuple[list[str], dict[str, str]]:
    """``pg_dump``/``pg_restore`` connection options, the password in the environment (not on a command line)."""
    parts = urlsplit(server.url)
    args = ["--host", parts.hostname or "127.0.0.1", "--port", str(parts.port or 5432),
            "--username", unquote(parts.username or ""), "--dbname", server.name_of(database), "--no-password"]
    return args, {**os.environ, "PGPASSWORD": unquote(parts.password or "")}


def _run(command: list[str], env: dict[str, str], what: str) -> None:
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise ServiceError(f"{what} failed (exit {done.returncode}): {done.stderr.strip()[-800:]}")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _scalar(server: Postgres, database: str, sql: str) -> int:
    connection = connect(server, database)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql)
            return int(cursor.fetchone()[0])
    finally:
        connection.close()


def _counts(server: Postgres, database: str) -> dict[str, int]:
    return {name: _scalar(server, database, sql) for name, sql in COUNTS[database].items()}


def _tables(server: Postgres, database: str) -> int:
    return _scalar(server, database, "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'")


def _pack(folder: Path, target: Path) -> None:
    with tarfile.open(target, "w:gz") as archive:
        archive.add(folder, arcname=".")


def backup(server: Postgres, artifacts: Path, destination: Path, dvc_remote: Path | None = None) -> dict:
    """Write the backup folder ``destination`` (which must not exist); returns its manifest."""
    if destination.exists():
        raise ServiceError(f"{destination} already exists: back up into a new folder")
    for folder in [artifacts, *([dvc_remote] if dvc_remote else [])]:
        if not folder.is_dir():
            raise ServiceError(f"{folder} is not a folder: nothing to back up there (wrong --run-dir or --dvc-remote?)")
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{destination.name}.partial-", dir=destination.parent))
    try:
        manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "source": server.shown, "contents": {}, "files": {}}
        for database in DATABASES:
            args, env = _client_args(server, database)
            _run([tool("pg_dump"), "--format=custom", "--no-owner", "--file", str(partial / f"{database}.dump"),
                  *args], env, f"pg_dump of {server.name_of(database)} at {server.shown}")
            manifest["contents"][database] = _counts(server, database)
        _pack(artifacts, partial / "artifacts.tar.gz")
        if dvc_remote is not None:
            _pack(dvc_remote, partial / "dvc-remote.tar.gz")
        manifest["files"] = {path.name: {"sha256": _sha256(path), "bytes": path.stat().st_size}
                             for path in sorted(partial.iterdir())}
        (partial / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        partial.rename(destination)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return manifest


def verify(source: Path) -> dict:
    """The manifest of the backup in ``source``, after checking that every file it names is there, unchanged."""
    try:
        manifest = json.loads((source / "manifest.json").read_text())
    except FileNotFoundError:
        raise ServiceError(f"{source} is not an edgeloop backup (no manifest.json)") from None
    except json.JSONDecodeError as error:
        raise ServiceError(f"{source}/manifest.json is not valid JSON ({error}): the backup is damaged") from None
    if manifest.get("format") != FORMAT:
        raise ServiceError(f"{source} has backup format {manifest.get('format')!r}; this edgeloop reads {FORMAT}")
    for name, expected in manifest.get("files", {}).items():
        path = source / name
        if not path.is_file():
            raise ServiceError(f"{path} is missing: the backup is incomplete, nothing was restored")
        if _sha256(path) != expected["sha256"]:
            raise ServiceError(f"{path} does not match its checksum in manifest.json: the backup is damaged, "
                               "nothing was restored")
    missing = [f"{database}.dump" for database in DATABASES if f"{database}.dump" not in manifest["files"]]
    if missing or "artifacts.tar.gz" not in manifest["files"]:
        raise ServiceError(f"{source} lacks {', '.join(missing) or 'artifacts.tar.gz'}: not a whole backup")
    return manifest


def _require_empty(target: Path) -> None:
    if target.exists() and any(target.iterdir()):
        raise ServiceError(f"{target} is not empty: restore into a fresh control plane (or move it away first)")


def _unpack(archive: Path, target: Path) -> None:
    """Into ``target`` (absent or empty: checked by :func:`restore` before anything is written), through a folder
    beside it: a failure leaves ``target`` as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.restoring-", dir=target.parent))
    try:
        with tarfile.open(archive, "r:gz") as handle:
            handle.extractall(staging, filter="data")
        if target.exists():
            target.rmdir()
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def restore(source: Path, server: Postgres, artifacts: Path, dvc_remote: Path | None = None,
            force: bool = False) -> dict:
    """Restore the backup in ``source`` onto ``server`` and into the two folders; returns its manifest."""
    manifest = verify(source)
    if "dvc-remote.tar.gz" in manifest["files"] and dvc_remote is None:
        raise ServiceError("the backup holds a DVC remote: name where it goes with --dvc-remote")
    ensure_databases(server)
    occupied = {server.name_of(database): _tables(server, database) for database in DATABASES}
    if any(occupied.values()) and not force:
        held = ", ".join(f"{name} ({count} tables)" for name, count in occupied.items() if count)
        raise ServiceError(f"{held} already hold data at {server.shown}: restore into a fresh control plane, or "
                           "pass --force to replace them")
    for target in [artifacts, *([dvc_remote] if dvc_remote else [])]:
        _require_empty(target)
    for database in DATABASES:
        args, env = _client_args(server, database)
        _run([tool("pg_restore"), "--no-owner", "--exit-on-error", *(["--clean", "--if-exists"] if force else []),
              *args, str(source / f"{database}.dump")], env, f"pg_restore into {server.name_of(database)}")
    _unpack(source / "artifacts.tar.gz", artifacts)
    if dvc_remote is not None and "dvc-remote.tar.gz" in manifest["files"]:
        _unpack(source / "dvc-remote.tar.gz", dvc_remote)
    return manifest
