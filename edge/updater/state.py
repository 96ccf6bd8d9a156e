"""The updater's own memory, ``<store>/updater.json``: the last manifest sequence it acted on and the last status.

Written atomically and fsynced (file and folder) before the status goes out, so after a crash or a
power cut the device neither re-applies a manifest it finished nor forgets a status it owes: the
last status is published again on every (re)connect. The sequence is per group; a device moved to
another group starts from 0 there.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from edge.errors import ConfigError, StoreError
from edge.files import atomic_write_text

STATE_FILE = "updater.json"
LOCK_FILE = ".updater.lock"


@dataclass
class UpdaterState:
    group: str | None = None
    last_sequence: int = 0  # of the last manifest whose outcome is known (installed, failed, refused)
    last_status: dict[str, Any] | None = None  # the status reported for it, republished on reconnect


def load_state(path: Path, group: str) -> UpdaterState:
    """The state at ``path`` for ``group`` (a fresh one when absent or recorded for another group)."""
    if not path.is_file():
        return UpdaterState(group)
    try:
        state = UpdaterState(**json.loads(path.read_text()))
        if not isinstance(state.last_sequence, int):
            raise TypeError(f"last_sequence is {state.last_sequence!r}")
    except (ValueError, TypeError) as error:
        raise StoreError(f"updater state {path} is damaged ({error}); delete it and the updater re-applies the "
                         "group's current manifest (the downgrade rule still holds)") from error
    return state if state.group == group else UpdaterState(group)


def save_state(path: Path, state: UpdaterState) -> None:
    """Replace ``path`` atomically and make the rename durable."""
    atomic_write_text(path, json.dumps(asdict(state), indent=2, sort_keys=True) + "\n")
    folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def hold_lock(store_root: Path) -> IO[str]:
    """Take the store's updater lock for this process's lifetime: two updaters on one store would race."""
    handle = open(store_root / LOCK_FILE, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(f"another updater is running on the store {store_root}; run one per store") from None
    return handle
