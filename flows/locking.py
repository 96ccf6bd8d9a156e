"""One flow run at a time writes a given set of output folders.

Runs without their own ``workspace`` share the repository paths from params.yaml; a nightly run and a
retrain run overlapping there would overwrite each other's data, models and reports. The lock is an
``flock`` on a file beside the data folder, held by the flow process and released when it ends (also
when a run suspends, since its process exits).
"""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tasks.config import Params

LOCK_FILE = ".edgeloop-outputs.lock"


def lock_path(config: Params) -> Path:
    return Path(config.data.output_dir).resolve().parent / LOCK_FILE


@contextmanager
def exclusive_outputs(config: Params) -> Iterator[Path]:
    """Block until no other run holds this config's output folders, then hold them."""
    path = lock_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
