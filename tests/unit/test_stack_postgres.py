"""The control plane's PostgreSQL helpers that need no server: URLs, hidden passwords, refusals that lose nothing.
(The server itself runs in tests/integration/test_control_plane_postgres.py.)"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tasks.stack.postgres import Postgres, _check_reachable, _initdb
from tasks.stack.processes import ServiceError
from tasks.stack.services import database_of


def test_database_urls_pick_the_driver_and_messages_never_show_the_password():
    server = Postgres("postgresql://edgeloop:pa55word@db.lan:5433")
    assert server.database_url("prefect", "asyncpg") == "postgresql+asyncpg://edgeloop:pa55word@db.lan:5433/prefect"
    assert server.database_url("mlflow") == "postgresql://edgeloop:pa55word@db.lan:5433/mlflow"
    assert server.shown == "postgresql://edgeloop:***@db.lan:5433" and "pa55word" not in server.shown


def _args(**changes) -> argparse.Namespace:
    return argparse.Namespace(**{"database": "sqlite", "database_url": None, "postgres_port": 5433,
                                 "postgres_dir": None, "database_prefix": "", **changes})


def test_the_database_option_is_sqlite_by_default_and_refuses_other_servers(tmp_path):
    assert database_of(_args(), tmp_path) is None
    given = database_of(_args(database_url="postgres://team:x@db.lan:5432/"), tmp_path)
    assert given.url == "postgresql://team:x@db.lan:5432"
    with pytest.raises(ServiceError, match=r"--database-url must be postgresql://.*'db:3306'") as refused:
        database_of(_args(database_url="mysql://root:hunter2@db:3306"), tmp_path)
    assert "hunter2" not in str(refused.value)


def test_a_data_folder_the_server_account_cannot_enter_is_named():
    root = Path(tempfile.mkdtemp(prefix="edgeloop-pg-unit-"))  # under /tmp: every folder above it is open
    try:
        closed = root / "closed"
        (closed / "postgres").mkdir(parents=True)
        closed.chmod(0o700)
        with pytest.raises(ServiceError, match=rf"cannot enter {closed} \(mode 700\).*--postgres-dir"):
            _check_reachable(closed / "postgres", "nobody")
        root.chmod(0o755)
        closed.chmod(0o755)
        _check_reachable(closed / "postgres", "nobody")
        _check_reachable(closed / "postgres", None)  # not root: the server runs as us
    finally:
        shutil.rmtree(root)


def test_a_failed_initdb_leaves_no_half_made_cluster(tmp_path):
    initdb = tmp_path / "initdb"
    initdb.write_text("#!/bin/sh\necho 'initdb: error: simulated failure' >&2\nmkdir -p \"$2/base\"\nexit 1\n")
    initdb.chmod(0o755)
    data, log = tmp_path / "pg" / "data", tmp_path / "postgres.log"
    (tmp_path / "pg").mkdir()
    with pytest.raises(ServiceError, match=r"(?s)initdb failed \(exit 1\).*simulated failure"):
        _initdb(str(initdb), data, "secret", None, log)
    assert not data.exists() and not (tmp_path / "pg" / ".initdb-password").exists()
    assert os.listdir(tmp_path / "pg") == [] and Path(log).is_file()
