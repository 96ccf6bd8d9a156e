"""PostgreSQL for a team's control plane: Prefect and MLflow keep their state in it instead of SQLite.

Debian's server (``apt-get install postgresql``) started by us like the other services: its own data
directory (``~/.cache/edgeloop/postgres``; ``/var/lib/edgeloop/postgres`` as root, since the server's
own user cannot enter root's home), its own port (5433, so a system cluster on 5432 is
left alone), password authentication (scram-sha-256; the password is generated once and kept beside the
data, mode 0600), a pid file and a log in the run folder. As root the server runs as Debian's ``postgres``
user (PostgreSQL refuses root). One database per service: ``prefect`` and ``mlflow``.

    edgeloop services up --database postgres      # this server, then Prefect and MLflow on it
    edgeloop services up --database-url postgresql://USER:PASSWORD@HOST:PORT   # a server you run
"""

from __future__ import annotations

import os
import pwd
import secrets
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, urlsplit, urlunsplit

from tasks.packaging.docker_client import CACHE_DIR
from tasks.stack.processes import Service, ServiceError, log_tail, process_alive, start, stop

DEFAULT_PORT = 5433
USER = "edgeloop"
DATABASES = ("prefect", "mlflow")
SERVER_USER = "postgres"  # Debian's: the server runs as it when we are root


@dataclass(frozen=True)
class Postgres:
    """Where a PostgreSQL server answers: ``postgresql://USER:PASSWORD@HOST:PORT`` without a database."""

    url: str
    prefix: str = ""  # before each database's name: several control planes (tests, a restore) on one server

    def name_of(self, database: str) -> str:
        """The real name of ``database`` (``prefect``, ``mlflow``) on this server; ``postgres``, the server's
        maintenance database, is never prefixed."""
        return database if database == "postgres" else f"{self.prefix}{database}"

    def database_url(self, database: str, driver: str = "") -> str:
        """The URL of ``database``; ``driver`` picks SQLAlchemy's (``asyncpg`` for Prefect, none for MLflow)."""
        parts = urlsplit(self.url)
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return urlunsplit((scheme, parts.netloc, f"/{self.name_of(database)}", "", ""))

    @property
    def shown(self) -> str:
        """The URL with its password hidden, for messages and logs."""
        parts = urlsplit(self.url)
        netloc = parts.netloc.split("@")[-1]
        user = parts.username or ""
        return urlunsplit((parts.scheme, f"{user}:***@{netloc}" if user else netloc, parts.path, "", ""))


def tool(name: str) -> str:
    """A PostgreSQL program (initdb, postgres, pg_dump, pg_restore): Debian's newest
    ``/usr/lib/postgresql/<major>/bin`` (the server's own major), else on PATH."""
    versions = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3]))
    found = str(versions[-1]) if versions else shutil.which(name)
    if found is None:
        raise ServiceError(f"PostgreSQL's {name} is not installed: apt-get install postgresql (or pass "
                           "--database-url for a server you run)")
    return found


def _binaries() -> tuple[str, str]:
    return tool("initdb"), tool("postgres")


def _server_user() -> str | None:
    """The account the server runs as: ``postgres`` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise ServiceError(f"running as root, but there is no {SERVER_USER!r} user to run PostgreSQL as: "
                           "apt-get install postgresql creates it") from None
    return SERVER_USER


def default_root() -> Path:
    return Path("/var/lib/edgeloop/postgres") if os.geteuid() == 0 else CACHE_DIR / "postgres"


def _check_reachable(root: Path, user: str | None) -> None:
    """The server's account must be able to enter every folder above its data (root's home is closed)."""
    if user is None:
        return
    account = pwd.getpwnam(user)
    for folder in [root.resolve(), *root.resolve().parents]:
        info = folder.stat()
        if not (info.st_mode & 0o001 or (info.st_uid == account.pw_uid and info.st_mode & 0o100)):
            raise ServiceError(f"PostgreSQL runs as {user!r}, which cannot enter {folder} (mode "
                               f"{info.st_mode & 0o777:o}) above its data folder {root}: choose one it can reach "
                               "(--postgres-dir, e.g. under /var/lib or /srv)")


def _hand_over(path: Path, user: str | None) -> None:
    if user is not None:
        account = pwd.getpwnam(user)
        os.chown(path, account.pw_uid, account.pw_gid)


def _initdb(initdb: str, data: Path, password: str, user: str | None, log: Path) -> None:
    """A new cluster in ``data`` with the password; a failed initdb leaves no half-made directory."""
    data.mkdir(parents=True)
    data.chmod(0o700)
    _hand_over(data, user)
    password_file = data.parent / ".initdb-password"
    password_file.write_text(password + "\n")
    password_file.chmod(0o600)
    _hand_over(password_file, user)
    try:
        with open(log, "ab") as handle:
            done = subprocess.run([initdb, "-D", str(data), "-U", USER, "-A", "scram-sha-256", "-E", "UTF8",
                                   f"--pwfile={password_file}", "--no-instructions"], user=user, stdout=handle,
                                  stderr=subprocess.STDOUT, timeout=120)
    finally:
        password_file.unlink(missing_ok=True)
    if done.returncode != 0:
        shutil.rmtree(data, ignore_errors=True)
        raise ServiceError(f"initdb failed (exit {done.returncode}); see {log}:\n{log_tail(log)}")


def _password(root: Path) -> str:
    path = root / "password"
    if not path.is_file():
        path.write_text(secrets.token_urlsafe(24) + "\n")
        path.chmod(0o600)
    return path.read_text().strip()


def connect(server: Postgres, database: str = "postgres", timeout_s: int = 5):
    """A psycopg2 connection (autocommit); :class:`ServiceError` naming the server when it does not answer."""
    import psycopg2

    try:
        connection = psycopg2.connect(server.database_url(database), connect_timeout=timeout_s)
    except psycopg2.OperationalError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ServiceError(f"PostgreSQL at {server.shown} does not answer ({reason}); start it with "
                           "`edgeloop services up --database postgres` (or `make control-plane`), or fix "
                           "--database-url") from None
    connection.autocommit = True
    return connection


def ensure_databases(server: Postgres, databases: tuple[str, ...] = DATABASES) -> None:
    """Create each database unless it exists (a restart finds them)."""
    connection = connect(server)
    try:
        with connection.cursor() as cursor:
            for database in map(server.name_of, databases):
                cursor.execute("SELECT 1 FROM pg_database WHERE datname = %s", (database,))
                if cursor.fetchone() is None:
                    cursor.execute(f'CREATE DATABASE "{database}"')
    finally:
        connection.close()


def _wait_ready(server: Postgres, service: Service, run_dir: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connect(server, timeout_s=2).close()
            return
        except ServiceError as error:
            if not process_alive(service.pid) or time.monotonic() > deadline:
                stop("postgres", run_dir)
                raise ServiceError(f"{error}; the server we started did not come up, see {service.log}:\n"
                                   f"{log_tail(service.log)}") from None
        time.sleep(0.3)


def start_postgres(run_dir: Path, port: int = DEFAULT_PORT, root: Path | None = None,
                   timeout_s: float = 60.0) -> Postgres:
    """Our PostgreSQL on ``127.0.0.1:port`` with its data in ``root/data`` (made on first use), the two
    databases created; reused when it already runs."""
    initdb, postgres = _binaries()
    user = _server_user()
    root = root or default_root()
    root.mkdir(parents=True, exist_ok=True)
    _check_reachable(root, user)
    server = Postgres(f"postgresql://{USER}:{quote(_password(root), safe='')}@127.0.0.1:{port}")
    run_dir.mkdir(parents=True, exist_ok=True)
    data, sockets = root / "data", root / "sockets"
    if not (data / "PG_VERSION").is_file():
        _initdb(initdb, data, _password(root), user, run_dir / "postgres.log")
    sockets.mkdir(exist_ok=True)
    _hand_over(sockets, user)
    command = [postgres, "-D", str(data), "-p", str(port), "-k", str(sockets), "-c", "listen_addresses=127.0.0.1"]
    service = start("postgres", command, run_dir, {}, None, server.shown, user=user)
    _wait_ready(server, service, run_dir, timeout_s)
    ensure_databases(server)
    return server
