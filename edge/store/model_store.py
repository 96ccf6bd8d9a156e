"""The device's model store: the last N signed versions, one active, switched atomically.

Layout under the store root::

    state.json             {"active", "history" (activation order), "installed" (install order), "rolled_back"}
    versions/<version>/    manifest.json, manifest.sig and the payload files, all read-only
    .staging/              unpack area on the same filesystem; leftovers of a killed install are removed
    .lock                  flock held while the store changes (installer, server, CLI may race)

Install: unpack into ``.staging``, verify signature and every sha256, make read-only and fsync,
rename into ``versions/`` (atomic), health-check, then replace ``state.json`` (atomic rename): a
reader sees the old active version or the new one, never a mix. A process killed at any step leaves
the previous version active and the store consistent; the next start cleans up. Versions past
``keep`` are pruned, never the active or the previous one.

``EDGELOOP_STORE_PAUSE_AT=<step>`` stops the installing process (SIGSTOP) after that step so the
crash tests can SIGKILL it exactly there; steps are listed in :data:`INSTALL_STEPS`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from edge.errors import BundleRefused, StoreError
from edge.files import atomic_write_text
from edge.signing import PublicKey
from edge.store.bundle import unpack, verify_folder
from edge.store.health import LoadedVersion, load_and_check
from edge.store.manifest import MANIFEST_FILE, Manifest

log = logging.getLogger(__name__)
INSTALL_STEPS = ("staged", "verified", "synced", "placed", "checked", "activated", "pruned")
PAUSE_ENV = "EDGELOOP_STORE_PAUSE_AT"
EventHook = Callable[[str, str, str], None]  # (event, version, reason)


@dataclass
class StoreState:
    active: str | None = None
    history: list[str] = field(default_factory=list)  # activation order, most recent last
    installed: list[str] = field(default_factory=list)  # install order, oldest first
    rolled_back: dict[str, str] = field(default_factory=dict)  # version -> why
    refused: dict[str, int] = field(default_factory=dict)  # reason -> bundles refused, by any process

    @property
    def previous(self) -> str | None:
        return self.history[-2] if len(self.history) >= 2 else None


def _pause_at(step: str) -> None:
    if os.environ.get(PAUSE_ENV) == step:
        os.kill(os.getpid(), signal.SIGSTOP)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(folder: Path) -> None:
    """Make the unpacked files read-only and durable before they become a version."""
    for path in folder.iterdir():
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    folder.chmod(0o555)
    _fsync_dir(folder)


def _remove_tree(path: Path) -> None:
    if path.exists():
        for folder in [path, *(p for p in path.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
        shutil.rmtree(path)


class ModelStore:
    """Versions on disk plus the pointer to the active one; see the module docstring."""

    def __init__(self, root: Path, public_keys: dict[str, PublicKey], keep: int = 3,
                 max_bundle_bytes: int = 512 * 2**20, on_event: EventHook | None = None) -> None:
        if keep < 2:
            raise StoreError(f"keep={keep}: a store keeps at least 2 versions (the active one and the previous)")
        self.root, self.keys, self.keep, self.max_bundle_bytes = Path(root), public_keys, keep, max_bundle_bytes
        self._on_event = on_event
        try:
            for folder in (self.versions_dir, self.staging_dir):
                folder.mkdir(parents=True, exist_ok=True)
            with self._locked(blocking=False) as locked:
                if locked:
                    self._recover()
        except OSError as error:
            raise StoreError(f"model store {self.root} is not usable ({error}); point --store "
                             "(EDGELOOP_STORE) at a writable folder") from error

    # ---- layout and state ------------------------------------------------------------------------

    @property
    def versions_dir(self) -> Path:
        return self.root / "versions"

    @property
    def staging_dir(self) -> Path:
        return self.root / ".staging"

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    def version_dir(self, version: str) -> Path:
        return self.versions_dir / version

    def state(self) -> StoreState:
        if not self.state_file.is_file():
            return StoreState()
        try:
            return StoreState(**json.loads(self.state_file.read_text()))
        except (ValueError, TypeError) as error:
            raise StoreError(f"{self.state_file} is damaged ({error}); restore it or reinstall a bundle") from error

    def _write_state(self, state: StoreState) -> None:
        atomic_write_text(self.state_file, json.dumps(asdict(state), indent=2) + "\n")
        _fsync_dir(self.root)

    @contextmanager
    def _locked(self, blocking: bool = True) -> Iterator[bool]:
        with open(self.root / ".lock", "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            yield True

    def _event(self, event: str, version: str, reason: str = "") -> None:
        level = logging.WARNING if event in ("refused", "rolled_back") else logging.INFO
        log.log(level, "model store: %s %s%s", event, version or "-", f": {reason}" if reason else "")
        if self._on_event is not None:
            self._on_event(event, version, reason)

    def _recover(self) -> None:
        """Drop what a killed install left in staging; adopt versions placed but not yet recorded."""
        for leftover in self.staging_dir.iterdir():
            _remove_tree(leftover)
        state = self.state()
        for folder in sorted(self.versions_dir.iterdir()):
            if folder.name not in state.installed:
                try:
                    verify_folder(folder, self.keys)
                    state.installed.append(folder.name)
                except BundleRefused as error:
                    self._event("discarded", folder.name, error.reason)
                    _remove_tree(folder)
        state.installed = [v for v in state.installed if self.version_dir(v).is_dir()]
        state.history = [v for v in state.history if v in state.installed]  # a prune killed before its record
        state.active = state.history[-1] if state.history else None
        if state != self.state():
            self._write_state(state)

    # ---- reading -----------------------------------------------------------------------------------

    def verified_manifest(self, version: str) -> Manifest:
        """Re-verify an installed version's signature and files (disk corruption happens) and return its manifest."""
        folder = self.version_dir(version)
        if not (folder / MANIFEST_FILE).is_file():
            raise StoreError(f"version {version} is not in the store {self.root}")
        return verify_folder(folder, self.keys)

    def load(self, version: str, num_threads: int | None = None) -> LoadedVersion:
        """Verify and health-check ``version``, returning it loaded and ready to serve."""
        return load_and_check(self.version_dir(version), self.verified_manifest(version), num_threads)

    # ---- changing ----------------------------------------------------------------------------------

    def install(self, bundle: Path, activate: bool = True) -> Manifest:
        """Install ``bundle`` (tar or folder); with ``activate`` health-check it and make it active."""
        with self._locked():
            manifest = self._place(Path(bundle))
            if activate:
                self._activate(manifest.version)
                self._prune()
                _pause_at("pruned")
        return manifest

    def _place(self, bundle: Path) -> Manifest:
        staging = Path(tempfile.mkdtemp(dir=self.staging_dir, prefix="install-"))
        try:
            unpack(bundle, staging, self.max_bundle_bytes)
            _pause_at("staged")
            manifest = verify_folder(staging, self.keys)
            _pause_at("verified")
            target = self.version_dir(manifest.version)
            if target.exists():
                if (target / MANIFEST_FILE).read_bytes() != (staging / MANIFEST_FILE).read_bytes():
                    raise BundleRefused("version_conflict", f"version {manifest.version} is already installed "
                                                            "with a different manifest; versions are immutable")
                self.verified_manifest(manifest.version)
                return manifest
            _seal(staging)
            _pause_at("synced")
            staging.rename(target)
            _fsync_dir(self.versions_dir)
            _pause_at("placed")
        except BundleRefused as error:
            state = self.state()
            state.refused[error.reason] = state.refused.get(error.reason, 0) + 1
            self._write_state(state)
            self._event("refused", bundle.name, f"{error.reason}: {error}")
            raise
        finally:
            _remove_tree(staging)
        state = self.state()
        state.installed = [v for v in state.installed if v != manifest.version] + [manifest.version]
        self._write_state(state)
        self._event("installed", manifest.version)
        return manifest

    def activate(self, version: str) -> None:
        """Health-check an installed ``version`` and make it the active one."""
        with self._locked():
            self._activate(version)

    def _activate(self, version: str) -> None:
        try:
            self.load(version)
        except BundleRefused as error:
            state = self.state()
            state.rolled_back[version] = f"{error.reason}: {error}"
            self._write_state(state)
            self._event("rolled_back", version, f"health check failed, {state.active or 'nothing'} stays active: "
                                                f"{error}")
            raise
        _pause_at("checked")
        state = self.state()
        if state.active == version:
            return
        state.history = [v for v in state.history if v != version] + [version]
        state.active = version
        state.rolled_back.pop(version, None)
        self._write_state(state)
        self._event("activated", version)
        _pause_at("activated")

    def rollback(self, reason: str) -> str:
        """Make the previous version active again; return it. The abandoned version stays installed."""
        with self._locked():
            state = self.state()
            if state.previous is None:
                raise StoreError(f"nothing to roll back to: {state.active or 'no version'} is the only one activated")
            abandoned = state.history.pop()
            state.active = state.history[-1]
            state.rolled_back[abandoned] = reason
            self._write_state(state)
        self._event("rolled_back", abandoned, f"{reason}; {state.active} is active again")
        return state.active

    def _prune(self) -> list[str]:
        state = self.state()
        protected = {state.active, state.previous}
        removable = [v for v in state.installed if v not in protected]
        doomed = removable[:max(0, len(state.installed) - self.keep)]
        if not doomed:
            return []
        for version in doomed:
            trash = Path(tempfile.mkdtemp(dir=self.staging_dir, prefix=f"prune-{version}-"))
            self.version_dir(version).rename(trash / version)  # atomic: gone from versions/ at once
        state.installed = [v for v in state.installed if v not in doomed]
        state.history = [v for v in state.history if v not in doomed or v in protected]
        for version in doomed:
            state.rolled_back.pop(version, None)
        self._write_state(state)
        for version in doomed:
            self._event("pruned", version)
        for leftover in self.staging_dir.glob("prune-*"):
            _remove_tree(leftover)
        return doomed

    def problems(self) -> list[str]:
        """What is inconsistent in the store (empty when all is well); the crash tests assert on it."""
        state, found = self.state(), []
        on_disk = sorted(p.name for p in self.versions_dir.iterdir())
        if sorted(state.installed) != on_disk:
            found.append(f"installed {sorted(state.installed)} but on disk {on_disk}")
        if missing := [v for v in state.history if v not in state.installed]:
            found.append(f"history names versions that are not installed: {missing}")
        if state.active is not None:
            if state.active not in state.installed:
                found.append(f"active {state.active} is not installed")
            else:
                try:
                    self.verified_manifest(state.active)
                except (BundleRefused, StoreError) as error:
                    found.append(f"active {state.active} does not verify: {error}")
        return found
