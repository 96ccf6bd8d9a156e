"""The fleet rollout contract shared by the control plane and the device updater: topics, messages, cohorts.

Topics (MQTT, QoS 1)::

    fleet/<group>/model                    control plane -> devices: the signed rollout manifest (retained)
    fleet/<group>/status/<device>          device -> control plane: installed / failed / skipped (retained)
    fleet/<group>/telemetry/<device>       device -> control plane: periodic summaries (never raw data)

A **rollout manifest** says which bundle version the devices of a cohort run. It is signed with the
control plane's Ed25519 key (:mod:`edge.signing`, the key that signs bundles) and published as
``{"manifest": "<the manifest's JSON text>", "signature": <the signature record>}``: the signature
covers the exact manifest text. Devices accept a manifest only when

- the signature verifies against a key they trust (unsigned or altered: refused);
- its ``sequence`` is above the last one they applied for the group (a replayed older manifest never
  downgrades a device), and
- it names a version older than the active one only as ``action: rollback`` (signed as one).

A manifest may name the **image** a container device runs, per architecture (``images``, each pinned by
digest): the same signature, sequence and downgrade rules cover it as the bundle (see :mod:`edge.agent`).

A release **per device class** (``classes``: device class -> :class:`ClassRelease`) gives each class of
device its own variant's bundle (and images), its own cohort cutoff, and its own action: a class whose
challenger proved unhealthy is rolled back while the others go on, and a class the release has nothing for
is held on what it runs. A device that knows its class (``--device-class``) acts on its class's entry only
(:func:`resolve_class`); the top-level fields then describe the release as a whole and no device installs
from them. A device without a class, or of a class the manifest does not name, refuses it, and so does one
whose entry needs a runtime it does not have: it keeps serving what it serves.

The **cohort** is the devices whose stable hash (sha256 of ``<rollout_id>:<device>``, as a fraction of
2**64) is at most ``cohort_cutoff``; the control plane picks the cutoff from its device list so that a
stage reaches exactly the devices it intends (5% rounded up, at least one), and widening only raises it,
so a device in the canary stays in every later stage.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Literal

from edge.errors import BundleRefused
from edge.schema import Record, SchemaError, setting
from edge.signing import PublicKey, sign_manifest, verify_manifest

if TYPE_CHECKING:  # the control plane signs; a device never imports cryptography
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SCHEMA = "edgeloop.rollout/1"
GROUP = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # MQTT topic level: no '/', '+' or '#'
HEX64 = re.compile(r"[0-9a-f]{64}")
ARCH = re.compile(r"[a-z0-9_]{1,16}")  # Docker's platform architectures: amd64, arm64, arm, ...
DIGEST_REFERENCE = re.compile(r"[a-z0-9][a-z0-9._:/-]*@sha256:[0-9a-f]{64}")  # images run only pinned by digest
ROLLOUT_ID_PATTERN = r"^[A-Za-z0-9._-]{1,64}$"
DEVICE_CLASS = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")  # a devices.yaml name: lowercase letters, digits, hyphens
RUNTIMES = ("tflite", "onnx")
MAX_MESSAGE_BYTES = 64 * 1024
MAX_CLASSES = 64


def model_topic(group: str) -> str:
    return f"fleet/{group}/model"


def status_topic(group: str, device: str) -> str:
    return f"fleet/{group}/status/{device}"


def telemetry_topic(group: str, device: str) -> str:
    return f"fleet/{group}/telemetry/{device}"


def cohort_position(rollout_id: str, device: str) -> float:
    """Where ``device`` falls in ``rollout_id``'s order, in [0, 1): stable, and independent per rollout."""
    digest = hashlib.sha256(f"{rollout_id}:{device}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def cohort_cutoff(rollout_id: str, devices: list[str], percent: float) -> float:
    """The cutoff that puts ``percent`` % of ``devices`` (rounded up, at least one) in the cohort."""
    if not devices:
        raise ValueError("a cohort needs at least one device")
    if not 0 < percent <= 100:
        raise ValueError(f"cohort percent must be in (0, 100], got {percent}")
    positions = sorted(cohort_position(rollout_id, device) for device in devices)
    count = max(1, -(-len(devices) * percent // 100))  # ceil without floats drifting below a whole device
    return 1.0 if count >= len(devices) else positions[int(count) - 1]


def _image_problems(images: dict[str, str], where: str) -> Iterator[str]:
    for arch, reference in images.items():
        if not ARCH.fullmatch(arch) or not DIGEST_REFERENCE.fullmatch(reference):
            yield (f"{where}[{arch!r}] = {reference!r}: an architecture (amd64, arm64, ...) and an image pinned by "
                   "digest (registry/repository@sha256:<64 hex>)")


class ClassRelease(Record):
    """What the devices of one class do with a manifest: install or roll back to their bundle, or hold."""

    action: Literal["install", "rollback", "hold"]
    version: str | None = setting(None, min_length=1, max_length=64)
    variant: str | None = setting(None, min_length=1, max_length=64)  # what the bundle serves, for the record
    runtime: Literal["tflite", "onnx"] | None = None                  # what the bundle needs on the device
    bundle_url: str | None = setting(None, min_length=1)
    bundle_sha256: str | None = setting(None, pattern=f"^{HEX64.pattern}$")
    images: dict[str, str] = setting(default_factory=dict, max_length=8)
    cohort_cutoff: float = setting(1.0, gt=0.0, le=1.0)
    reason: str = setting("", max_length=1000)                        # a rollback or a hold says why

    def problems(self) -> Iterator[str]:
        if self.action != "hold" and None in (self.version, self.bundle_url, self.bundle_sha256, self.runtime):
            yield f"an {self.action} entry needs version, runtime, bundle_url and bundle_sha256"
        if self.action != "install" and not self.reason:
            yield f"a {self.action} entry must say why (reason)"
        yield from _image_problems(self.images, "images")


class RolloutManifest(Record):
    """What devices of ``group`` whose cohort position is at most ``cohort_cutoff`` should run."""

    schema_id: Literal["edgeloop.rollout/1"] = setting(SCHEMA, alias="schema")
    rollout_id: str = setting(pattern=ROLLOUT_ID_PATTERN)
    group: str = setting(pattern=f"^{GROUP.pattern}$")  # the whole text: one MQTT topic level
    sequence: int = setting(ge=1)                 # per group, increasing with every manifest published
    action: Literal["install", "rollback"]
    model_name: str = setting(min_length=1)
    version: str = setting(min_length=1, max_length=64)   # the bundle version devices end up on
    bundle_url: str = setting(min_length=1)               # where the bundle is fetched (http(s) or file)
    bundle_sha256: str = setting(pattern=f"^{HEX64.pattern}$")  # the bundle is installed only with this digest
    image: str | None = None                              # the amd64 image, as devices before ``images`` read it
    images: dict[str, str] = setting(default_factory=dict, max_length=8)  # arch -> repository@sha256:... (containers)
    previous_version: str | None = None                   # what the cohort ran before this rollout
    cohort_cutoff: float = setting(gt=0.0, le=1.0)
    stage: str = setting("canary", min_length=1, max_length=32)
    jitter_s: float = setting(0.0, ge=0.0, le=3600.0)     # devices wait uniformly in [0, jitter_s] before fetching
    issued_at: float
    reason: str = ""                                      # a rollback says why
    classes: dict[str, ClassRelease] = setting(default_factory=dict, max_length=MAX_CLASSES)  # device class -> its part

    def problems(self) -> Iterator[str]:
        if self.action == "rollback" and not self.reason:
            yield "a rollback manifest must say why (reason)"
        yield from _image_problems(self.images, "images")
        for name in self.classes:
            if len(name) > 64 or not DEVICE_CLASS.fullmatch(name):
                yield (f"classes[{name[:80]!r}]: a device class is a devices.yaml name (lowercase letters, digits, "
                       "single hyphens; at most 64)")

    def image_for(self, arch: str) -> str | None:
        """The image a container device of ``arch`` runs (None: a model-only rollout for it)."""
        return self.images.get(arch)

    def includes(self, device: str) -> bool:
        return cohort_position(self.rollout_id, device) <= self.cohort_cutoff

    def to_text(self) -> str:
        """The signed text. Without images (classes), the field is left out: devices that predate it (their schema
        forbids unknown fields) keep taking model-only, whole-fleet rollouts; one with it needs devices that read it."""
        content = self.to_dict()
        for name in ("images", "classes"):
            if not content[name]:
                del content[name]
        return json.dumps(content, sort_keys=True, separators=(",", ":"))


ClassVerdict = Literal["held", "no_class", "unknown_class", "wrong_runtime"]


def resolve_class(manifest: RolloutManifest, device_class: str | None,
                  runtimes: tuple[str, ...] | None) -> tuple[RolloutManifest | None, ClassVerdict | None, str]:
    """(the manifest as this device acts on it, None, '') or (None, why not, in words).

    A manifest without classes is the whole fleet's: every device acts on it as it is. With classes, the
    device's entry replaces the top-level action, version, bundle, images, cohort cutoff and reason; ``held``
    means the release has nothing for the class (nothing to do, nothing to report); the other verdicts are
    refusals the device reports. ``runtimes`` (None: not checked, e.g. a container device whose image carries
    the runtime) are the runtimes this device can serve.
    """
    if not manifest.classes:
        return manifest, None, ""
    if device_class is None:
        named = ", ".join(sorted(manifest.classes))
        return None, "no_class", (f"rollout {manifest.rollout_id} is per device class ({named}) and this device has "
                                  "none: set its --device-class")
    entry = manifest.classes.get(device_class)
    if entry is None:
        return None, "unknown_class", (f"rollout {manifest.rollout_id} has nothing for device class {device_class!r} "
                                       f"(it names {', '.join(sorted(manifest.classes))})")
    if entry.action == "hold":
        return None, "held", f"class {device_class} is held on what it runs: {entry.reason}"
    if runtimes is not None and entry.runtime not in runtimes:
        return None, "wrong_runtime", (f"class {device_class}'s {entry.variant or 'bundle'} needs the {entry.runtime} "
                                       f"runtime; this device has {', '.join(runtimes) or 'none'}")
    assert entry.version and entry.bundle_url and entry.bundle_sha256  # checked by ClassRelease
    return manifest.replace(
        action=entry.action, version=entry.version, bundle_url=entry.bundle_url, bundle_sha256=entry.bundle_sha256,
        images=entry.images, image=entry.images.get("amd64"), cohort_cutoff=entry.cohort_cutoff, reason=entry.reason,
        classes={}), None, ""


def sign_rollout(manifest: RolloutManifest, private_key: Ed25519PrivateKey) -> bytes:
    """The MQTT payload: the manifest text and its detached signature."""
    text = manifest.to_text()
    signature = json.loads(sign_manifest(text.encode(), private_key))
    return json.dumps({"manifest": text, "signature": signature}, sort_keys=True).encode()


def verify_rollout(payload: bytes, keys: dict[str, PublicKey]) -> RolloutManifest:
    """The manifest in ``payload`` once its signature verifies; :class:`BundleRefused` names what is wrong."""
    if len(payload) > MAX_MESSAGE_BYTES:
        raise BundleRefused("malformed", f"rollout message of {len(payload)} bytes, over {MAX_MESSAGE_BYTES}")
    try:
        envelope: Any = json.loads(payload)
        text = envelope["manifest"]
        signature = envelope.get("signature")
        if not isinstance(text, str):
            raise TypeError("manifest is not a string")
        signature_bytes = None if signature is None else json.dumps(signature).encode()
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
        # RecursionError: a deeply nested document (the size cap alone still lets ~30,000 levels through)
        raise BundleRefused("malformed", f"rollout message is not a manifest envelope ({error})") from None
    verify_manifest(text.encode(), signature_bytes, keys)
    try:
        return RolloutManifest.from_json(text)
    except SchemaError as error:
        raise BundleRefused("malformed", f"signed rollout manifest does not validate: {error}") from None


def version_number(version: str) -> tuple[int, ...] | None:
    """``v12`` / ``12`` / ``1.4.2`` as a comparable tuple; None when the version has no numbers to compare."""
    parts = re.findall(r"\d+", version)
    return tuple(int(part) for part in parts) if parts else None


Verdict = Literal["apply", "not_in_cohort", "already_active", "stale", "downgrade"]


def judge(manifest: RolloutManifest, device: str, last_sequence: int, active: str | None) -> tuple[Verdict, str]:
    """What a device does with a verified manifest, given the last sequence it applied and its active version."""
    if manifest.sequence <= last_sequence:
        return "stale", (f"sequence {manifest.sequence} is not after the last applied {last_sequence}: a replayed or "
                         "out-of-order manifest is ignored")
    if not manifest.includes(device):
        return "not_in_cohort", f"not in the {manifest.stage} cohort of {manifest.rollout_id}"
    if active == manifest.version:
        return "already_active", f"{manifest.version} is already active"
    new, current = version_number(manifest.version), version_number(active or "")
    if manifest.action == "install" and new is not None and current is not None and new < current:
        return "downgrade", (f"{manifest.version} is older than the active {active}; only a manifest signed as a "
                             "rollback may go back")
    return "apply", f"{manifest.action} {manifest.version} ({manifest.stage})"
