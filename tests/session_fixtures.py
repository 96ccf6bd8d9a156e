"""Session fixtures the conftest re-exports (pytest finds fixtures by name in tests/conftest.py): signed model
bundles built from the tiny models, and one PostgreSQL for the session."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

# ---- signed model bundles (edge service, model store) ---------------------------------------------

@dataclass(frozen=True)
class BundleKit:
    """Signing keys and model files with sidecars, to build signed bundles in tests."""

    root: Path
    private_key: object
    public_dir: Path
    model_files: dict[str, Path]
    sample: np.ndarray

    def bundle(self, version: str, primary: str = "tflite_int8", large: str | None = None,
               name: str | None = None, options: dict | None = None) -> Path:
        """A signed bundle of the tiny model's ``primary`` variant; ``options``: its ``runtime_options``."""
        from edge.store.manifest import RuntimeSettings
        from tasks.registry.bundle import bundle_from_files

        files = {"primary": self.model_files[primary]}
        if large is not None:
            files["large"] = self.model_files[large]
        return bundle_from_files(self.root / "bundles" / (name or f"{version}.tar.gz"), version, "edgeloop-digits",
                                 version.lstrip("v"), None, files, self.sample, self.private_key,
                                 RuntimeSettings(**options) if options else None)

    def trusted_keys(self) -> dict:
        from edge.signing import load_public_keys

        return load_public_keys([self.public_dir])


@pytest.fixture(scope="session")
def bundle_kit(tiny_model_files, digits, tmp_path_factory) -> BundleKit:
    """Keys plus the tiny models with convert-stage-like sidecars; bundles are built on demand."""
    import shutil

    from edge.runtime import EdgeModel
    from edge.sidecar import write_sidecar
    from tasks.registry.bundle import generate_keypair, load_private_key

    root = tmp_path_factory.mktemp("bundle_kit")
    private_path, _ = generate_keypair(root / "keys" / "private", "test-signer")
    public_dir = root / "keys" / "public"
    public_dir.mkdir()
    shutil.copy(private_path.with_suffix(".pub"), public_dir / "test-signer.pub")
    models = {}
    for variant, source in tiny_model_files.items():
        target = root / "models" / source.name
        target.parent.mkdir(exist_ok=True)
        shutil.copy(source, target)
        loaded = EdgeModel.load(target)
        write_sidecar(target, {"variant": variant, "runtime": loaded.runtime, "labels": [str(i) for i in range(10)],
                               "input": {"shape": list(loaded.input.shape)}, "data_version": "test-data",
                               "git_commit": "test-commit", "params_hash": "test-params"})
        models[variant] = target
    return BundleKit(root, load_private_key(private_path), public_dir, models, digits.x[700:716])


# ---- one PostgreSQL for the session (the team control plane's store) --------------------------------------

@dataclass
class SharedPostgres:
    """The session's PostgreSQL, started by tasks/stack/postgres.py; each test takes databases of its own."""

    server: object  # tasks.stack.postgres.Postgres, without a prefix
    root: Path
    run_dir: Path
    port: int
    taken: int = 0

    def fresh(self):
        """A Postgres whose ``prefect`` and ``mlflow`` databases are new and empty (a prefix of their own)."""
        from dataclasses import replace

        from tasks.stack.postgres import ensure_databases

        self.taken += 1
        fresh = replace(self.server, prefix=f"t{os.getpid()}_{self.taken}_")
        ensure_databases(fresh)
        return fresh

    def restart(self) -> None:
        """Stop the server and start it again on the same data and port (clients see it go away)."""
        from tasks.stack.postgres import start_postgres
        from tasks.stack.processes import stop

        stop("postgres", self.run_dir)
        start_postgres(self.run_dir, self.port, self.root / "postgres")


@pytest.fixture(scope="session")
def shared_postgres() -> Iterator[SharedPostgres]:
    """PostgreSQL on a free port, its data in a folder the server's account can reach (not pytest's 0700 one)."""
    import tempfile

    from tasks.stack import postgres as pg
    from tasks.stack.processes import ServiceError, stop
    from tasks.stack.services import free_port
    from tests.conftest import skip_unless_ci

    try:
        pg.tool("postgres")
    except ServiceError as error:
        skip_unless_ci(str(error))
    root = Path(tempfile.mkdtemp(prefix="edgeloop-pg-"))
    root.chmod(0o755)
    run_dir, port = root / "run", free_port()
    server = pg.start_postgres(run_dir, port, root / "postgres")
    yield SharedPostgres(server, root, run_dir, port)
    stop("postgres", run_dir)
    shutil.rmtree(root, ignore_errors=True)
