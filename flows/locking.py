"""One flow run at a time writes a given workspace.

Runs without their own ``workspace`` share the repository's; a nightly run and a retrain run
overlapping there would overwrite each other's data, models and reports. The lock is an ``flock`` on
the workspace's lock file, held by the flow process and released when it ends (also when a run
suspends, since its process exits).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.contracts import Workspace


@contextmanager
def exclusive_outputs(workspace: Workspace) -> Iterator[Path]:
    """Block until no other run holds this workspace's outputs, then hold them."""
    path = workspace.lock_file
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
