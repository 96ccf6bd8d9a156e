"""What the device updater does with one message of ``fleet/<group>/model``: verify, judge, apply, report.

Outcomes, reported on ``fleet/<group>/status/<device>`` (QoS 1, retained) as
``{"device", "group", "rollout_id", "sequence", "state", "version", "target", "reason", "at"}``:

- ``refused``: the message does not verify (``malformed``, ``unsigned``, ``unknown_key``,
  ``bad_signature``: rollout fields are null, since nothing in it can be trusted), is signed for another
  group (``wrong_group``), installs an older version without being a rollback (``downgrade``), or is a
  per-class release this device cannot take (``no_class``: it has no class; ``unknown_class``: the release
  does not name its class; ``wrong_runtime``: its class's bundle needs a runtime it lacks;
  :func:`edge.rollout.resolve_class`). Nothing is installed.
- ``installed``: the target version is active (applied now, or ``already_active``: an idempotent ack).
- ``failed``: the attempt did not end on the target (``digest_mismatch``, ``fetch_failed``, ``too_large``,
  ``version_mismatch``, the store's refusal reasons such as ``tampered`` or ``health_check``,
  ``store_error``, ``io_error``; on a container device, ``image_pull``, ``image_start``, ``image_not_ready``,
  ``image_health``: :mod:`edge.agent.service`); the store keeps (or goes back to) the previous version
  active and the old container serves on.

A replayed or older manifest (``stale``), a manifest whose cohort leaves this device out
(``not_in_cohort``) and one that holds this device's class where it is (``held``) change nothing and
report nothing: the control plane counts ``installed`` and ``failed`` from cohort devices only, so silence
from the others is what it needs.

``version`` is the active version after the attempt, ``target`` the manifest's version (its class's, in a
per-class release); ``variant`` the variant the active version serves and ``device_class`` the class the
device was configured with, so the control plane sees a device that runs another class's bundle. The sequence
is recorded (with the status, see :mod:`edge.updater.state`) only once the outcome is known, so a
device killed mid-install applies the manifest again when its retained copy arrives after restart;
the store's atomic install leaves it on a consistent version meanwhile.
"""

from __future__ import annotations

import json
import logging
import random
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edge.errors import BundleRefused, StoreError
from edge.rollout import RolloutManifest, judge, resolve_class, status_topic, verify_rollout
from edge.signing import PublicKey
from edge.store.manifest import MANIFEST_FILE, parse_manifest
from edge.store.model_store import ModelStore
from edge.updater.fetch import RolloutFailed, fetch_bundle
from edge.updater.state import STATE_FILE, load_state, save_state

log = logging.getLogger(__name__)
DOWNLOAD_PREFIX = ".download-"
Publish = Callable[[str, bytes, bool], None]  # (topic, payload, retain); always QoS 1


class ImageService(Protocol):
    """What serves the model on a container device (:class:`edge.agent.service.ServiceContainer`)."""

    def update(self, image: str, version: str) -> bool: ...

    def confirm(self, version: str) -> None: ...


Fetch = Callable[[str, Path, int], str]  # (url, destination, max_bytes) -> sha256 of what was written


class RolloutHandler:
    """Applies verified rollout manifests to one device's :class:`ModelStore` and reports each outcome."""

    def __init__(self, device: str, group: str, store: ModelStore, keys: dict[str, PublicKey],
                 publish: Publish, fetch: Fetch = fetch_bundle, rng: random.Random | None = None,
                 clock: Callable[[], float] = time.time, service: ImageService | None = None,
                 arch: str = "amd64", device_class: str | None = None,
                 runtimes: tuple[str, ...] | None = None) -> None:
        self.device, self.group, self.store, self.keys = device, group, store, keys
        self.device_class, self.runtimes = device_class, runtimes  # runtimes None: not checked (container device)
        self.service, self.arch = service, arch  # a container device: the image part of manifests applies
        self.publish, self.fetch, self.clock = publish, fetch, clock
        self.rng = rng or random.Random()
        self.stopping = threading.Event()  # set on shutdown: cuts a jitter wait short, nothing is recorded
        self.state_path = store.root / STATE_FILE
        self.state = load_state(self.state_path, group)
        self._lock = threading.Lock()
        for leftover in store.root.glob(f"{DOWNLOAD_PREFIX}*"):  # a download a killed updater left behind
            leftover.unlink(missing_ok=True)

    @property
    def topic(self) -> str:
        return status_topic(self.group, self.device)

    def last_status(self) -> dict[str, Any] | None:
        """The status of the last manifest with a known outcome (republished on every reconnect)."""
        with self._lock:
            return self.state.last_status

    def handle(self, payload: bytes) -> dict[str, Any] | None:
        """Act on one model message; return the status published, or None when there is nothing to report."""
        try:
            manifest = verify_rollout(payload, self.keys)
        except BundleRefused as error:
            log.warning("rollout message refused (%s): %s", error.reason, error)
            return self._report(self._status(None, "refused", error.reason))
        if manifest.group != self.group:
            log.warning("rollout %s is signed for group %s, not %s: refused", manifest.rollout_id, manifest.group,
                        self.group)
            return self._report(self._status(manifest, "refused", "wrong_group"))
        if manifest.classes and manifest.sequence > self.state.last_sequence:
            mine, refusal, why = resolve_class(manifest, self.device_class, self.runtimes)
            if mine is None:
                log.log(logging.INFO if refusal == "held" else logging.WARNING, "rollout %s #%d: %s (%s)",
                        manifest.rollout_id, manifest.sequence, refusal, why)
                return None if refusal == "held" else self._finish(manifest, "refused", refusal or "")
            manifest = mine
        verdict, why = judge(manifest, self.device, self.state.last_sequence, self.active_version())
        log.info("rollout %s #%d (%s %s): %s, %s", manifest.rollout_id, manifest.sequence, manifest.action,
                 manifest.version, verdict, why)
        if verdict in ("stale", "not_in_cohort"):
            return None
        if verdict == "already_active":
            return self._finish(manifest, "installed", "already_active")
        if verdict == "downgrade":
            return self._finish(manifest, "refused", "downgrade")
        if self.stopping.wait(self.rng.uniform(0.0, manifest.jitter_s)):  # spread the fleet's fetches
            return None
        try:
            self._apply(manifest)
        except (RolloutFailed, BundleRefused) as error:
            return self._failed(manifest, error.reason, error)
        except StoreError as error:
            return self._failed(manifest, "store_error", error)
        except OSError as error:
            return self._failed(manifest, "io_error", error)
        return self._finish(manifest, "installed", "")

    # ---- applying ----------------------------------------------------------------------------------

    def _apply(self, manifest: RolloutManifest) -> None:
        """End with ``manifest.version`` active (and, on a container device, served by the manifest's image for
        this architecture), or raise with the store and the service container as they were."""
        before = self.store.state().active
        self._apply_bundle(manifest)
        if self.service is None:
            return
        image = manifest.image_for(self.arch)
        try:
            if image is None:  # the model alone: done once the running container serves it
                self.service.confirm(manifest.version)
            else:
                self.service.update(image, manifest.version)
        except RolloutFailed:
            if before is not None and before != manifest.version:
                self.store.activate(before)  # the old container goes on serving what it served
            raise

    def _apply_bundle(self, manifest: RolloutManifest) -> None:
        """End with ``manifest.version`` active in the store, or raise with it still on its previous version."""
        state = self.store.state()
        if manifest.version in state.installed:  # no download: installed versions are immutable and signed
            if manifest.action == "rollback" and state.previous == manifest.version:
                self.store.load(manifest.version)  # health-check before switching back (activate does too)
                self.store.rollback(f"rollout {manifest.rollout_id} #{manifest.sequence}: {manifest.reason}")
            else:
                self.store.activate(manifest.version)
            return
        with tempfile.NamedTemporaryFile(dir=self.store.root, prefix=DOWNLOAD_PREFIX, suffix=".tar.gz") as handle:
            bundle = Path(handle.name)  # on the store's filesystem, not /tmp (often RAM): bundles can be large
            digest = self.fetch(manifest.bundle_url, bundle, self.store.max_bundle_bytes)
            if digest != manifest.bundle_sha256:
                raise RolloutFailed("digest_mismatch", f"{manifest.bundle_url} has sha256 {digest[:12]}..., the "
                                                       f"signed manifest says {manifest.bundle_sha256[:12]}...")
            placed = self.store.install(bundle, activate=False)  # verified and placed, not serving yet
            if placed.version != manifest.version:
                raise RolloutFailed("version_mismatch", f"{manifest.bundle_url} holds version {placed.version}, "
                                                        f"the rollout names {manifest.version}")
            self.store.install(bundle)  # already placed: re-verified, health-checked, activated, pruned

    def active_version(self) -> str | None:
        try:
            return self.store.state().active
        except StoreError as error:
            log.error("model store state unreadable: %s", error)
            return None

    def active_variant(self, version: str | None) -> str | None:
        """The variant ``version`` serves, from its bundle manifest (verified when it was installed and activated;
        None when unreadable)."""
        if version is None:
            return None
        try:
            return parse_manifest((self.store.version_dir(version) / MANIFEST_FILE).read_bytes()).variant
        except (BundleRefused, OSError) as error:
            log.error("the manifest of active version %s is unreadable: %s", version, error)
            return None

    # ---- reporting ---------------------------------------------------------------------------------

    def _status(self, manifest: RolloutManifest | None, outcome: str, reason: str) -> dict[str, Any]:
        active = self.active_version()
        return {"device": self.device, "group": self.group,
                "rollout_id": manifest.rollout_id if manifest else None,
                "sequence": manifest.sequence if manifest else None, "state": outcome, "version": active,
                "target": manifest.version if manifest else None, "reason": reason,
                "at": self.clock(), "variant": self.active_variant(active), "device_class": self.device_class}

    def _failed(self, manifest: RolloutManifest, reason: str, error: Exception) -> dict[str, Any]:
        log.error("rollout %s #%d failed (%s): %s", manifest.rollout_id, manifest.sequence, reason, error)
        return self._finish(manifest, "failed", reason)

    def _finish(self, manifest: RolloutManifest, outcome: str, reason: str) -> dict[str, Any]:
        """Record the outcome durably, then report it: a crash in between republishes it on restart."""
        status = self._status(manifest, outcome, reason)
        with self._lock:
            self.state.last_sequence, self.state.last_status = manifest.sequence, status
            save_state(self.state_path, self.state)
        return self._report(status)

    def _report(self, status: dict[str, Any]) -> dict[str, Any]:
        self.publish(self.topic, json_bytes(status), True)
        return status


def json_bytes(document: dict[str, Any]) -> bytes:
    """A message payload: compact JSON, keys sorted."""
    return json.dumps(document, sort_keys=True, separators=(",", ":")).encode()
