"""SIGKILL the installer after every step of an install: the store stays consistent, the server keeps answering."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from edge.signing import load_public_keys
from edge.store.model_store import INSTALL_STEPS, PAUSE_ENV, ModelStore
from tests.conftest import REPO_ROOT
from tests.edge_helpers import running_edge_server
from tests.stack_helpers import wait_for


def stopped(pid: int) -> bool:
    """True once the process stopped itself (SIGSTOP at the requested step): state T in /proc."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_killing_the_installer_at_every_step(tmp_path, bundle_kit, digits):
    keys = load_public_keys([bundle_kit.public_dir])
    ModelStore(tmp_path / "store", keys).install(bundle_kit.bundle("v1"))
    sample = digits.x[:1]
    expected = "v1"
    with running_edge_server(tmp_path, bundle_kit.public_dir) as server:
        for number, step in enumerate(INSTALL_STEPS, start=2):
            version = f"v{number}"
            installer = subprocess.Popen(
                [sys.executable, "-m", "edge.store.storectl", "--store", str(server.store), "--public-keys",
                 str(bundle_kit.public_dir), "install", str(bundle_kit.bundle(version))],
                cwd=REPO_ROOT, env={**os.environ, PAUSE_ENV: step}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            try:
                wait_for(lambda process=installer: stopped(process.pid) or process.poll() is not None, 60,
                         f"the installer to stop after {step}", interval_s=0.05)
                assert installer.poll() is None, f"the installer exited instead of pausing at {step}: " + \
                    installer.stdout.read().decode()
                if INSTALL_STEPS.index(step) < INSTALL_STEPS.index("activated"):
                    response = server.predict(sample)  # mid-install: the previous version answers
                    assert response.status_code == 200 and response.json()["version"] == expected, step
            finally:
                installer.kill()
                installer.wait()
            if INSTALL_STEPS.index(step) >= INSTALL_STEPS.index("activated"):
                expected = version  # the pointer had switched: the new version is complete and verified
            reopened = ModelStore(server.store, keys)  # what the next installer or a restarted server does
            assert reopened.problems() == [], step
            assert reopened.state().active == expected, step
            assert list(reopened.staging_dir.iterdir()) == [], step
            wait_for(lambda wanted=expected: server.predict(sample).json()["version"] == wanted, 20,
                     f"the server to answer with {expected} after a kill at {step}", interval_s=0.1)
        assert len(ModelStore(server.store, keys).state().installed) == 3  # pruned at the last install
