"""What the control plane accepts from a device: status and telemetry messages, parsed as untrusted input.

Every byte on ``fleet/<group>/status/<device>`` and ``fleet/<group>/telemetry/<device>`` comes from a
device, and an enrolled device may be hostile. A message is accepted only when

- it is at most :data:`MAX_MESSAGE_BYTES` long (checked before parsing);
- it is JSON (pydantic's Rust parser: nesting deeper than its limit, ``NaN`` and ``Infinity`` literals
  and invalid UTF-8 are parse errors, never a ``RecursionError``);
- it matches :class:`DeviceStatus` or :class:`TelemetrySummary` exactly: the fields ``edge/updater*.py``
  publishes and no others, strict types (no ``"5"`` for 5, no ``true`` for 1), finite numbers within
  bounds (counts from 0 to :data:`MAX_COUNT`, errors at most requests, rates and confidences in [0, 1],
  latencies up to :data:`MAX_LATENCY_MS`);
- the topic's device is a device id under :mod:`edge.identity` and the payload names the same device.

Anything else raises :class:`MessageRefused` with one of :data:`DROP_REASONS`; :class:`DropCounts`
counts them per device and reason, for the rollout report and the Prometheus counter
``edgeloop_rollout_dropped_messages_total{device, reason}``.
"""

from __future__ import annotations

import functools
import logging
import threading
from typing import Annotated, Any, Literal

from prometheus_client import Counter
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import from_json

from edge.identity import DEVICE_ID_JSON_SCHEMA, check_device_id, is_device_id
from edge.rollout import DEVICE_CLASS, GROUP, ROLLOUT_ID_PATTERN
from edge.store.manifest import VERSION_PATTERN

log = logging.getLogger(__name__)
MAX_MESSAGE_BYTES = 8 * 1024      # a status or a summary is ~300 bytes; room for long versions and reasons
MAX_COUNT = 10**9                 # requests or errors in one summary: a billion, far past any edge device
MAX_LATENCY_MS = 3_600_000.0      # an hour: a request's latency beyond that is no measurement
MAX_SEQUENCE = 2**53              # manifest sequences are JSON numbers: exact integers only
MAX_TIMESTAMP = 2**33             # seconds since 1970: beyond the year 2200
INVALID_DEVICE = "invalid-id"     # the device label of a message whose topic names no valid device id

DropReason = Literal["too_large", "not_json", "invalid", "device_mismatch", "bad_device_id", "error"]
DROP_REASONS: tuple[DropReason, ...] = ("too_large", "not_json", "invalid", "device_mismatch", "bad_device_id",
                                        "error")

# edge.identity's rule as a pydantic type (the device side has no pydantic): its message, its pattern for forms
DeviceId = Annotated[str, AfterValidator(check_device_id), WithJsonSchema(DEVICE_ID_JSON_SCHEMA)]
Version = Annotated[str, StringConstraints(pattern=VERSION_PATTERN)]  # a bundle version, as the manifest allows
Count = Annotated[int, Field(ge=0, le=MAX_COUNT)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]
LatencyMs = Annotated[float, Field(ge=0.0, le=MAX_LATENCY_MS)]
Timestamp = Annotated[float, Field(ge=0.0, le=MAX_TIMESTAMP)]


class _DeviceMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, allow_inf_nan=False)
    device: DeviceId


class DeviceStatus(_DeviceMessage):
    """An install outcome (``edge/updater/apply.py``); rollout fields are null for a message it could not trust."""

    group: Annotated[str, StringConstraints(pattern=f"^{GROUP.pattern}$")]
    rollout_id: Annotated[str, StringConstraints(pattern=ROLLOUT_ID_PATTERN)] | None
    sequence: Annotated[int, Field(ge=1, le=MAX_SEQUENCE)] | None
    state: Literal["installed", "failed", "refused"]
    version: Version | None
    target: Version | None
    reason: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.:-]{0,64}$")]  # a code such as health_check
    at: Timestamp
    variant: Annotated[str, StringConstraints(pattern=r"^[a-z0-9_]{1,64}$")] | None = None  # what it serves
    device_class: Annotated[str, StringConstraints(pattern=f"^{DEVICE_CLASS.pattern}$", max_length=64)] | None = None


class TelemetrySummary(_DeviceMessage):
    """One interval's figures (``edge/updater/telemetry.py``); ``at`` is the device's clock, never trusted."""

    version: Version | None
    window_s: Annotated[float, Field(ge=0.0, le=MAX_TIMESTAMP)]
    requests: Count
    errors: Count
    error_rate: Fraction
    p50_ms: LatencyMs | None
    p95_ms: LatencyMs | None
    mean_confidence: Fraction | None
    at: Timestamp

    @model_validator(mode="after")
    def _errors_are_requests(self) -> TelemetrySummary:
        if self.errors > self.requests:
            raise ValueError(f"errors ({self.errors}) exceed requests ({self.requests})")
        return self


class MessageRefused(Exception):
    """A device message the control plane drops; ``reason`` is one of :data:`DROP_REASONS`."""

    def __init__(self, reason: DropReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


SCHEMAS: dict[str, type[_DeviceMessage]] = {"status": DeviceStatus, "telemetry": TelemetrySummary}


def parse_device_message(kind: str, device: str, payload: bytes) -> dict[str, Any]:
    """The validated message of ``kind`` (``status`` or ``telemetry``) from ``device``'s topic, as a plain dict.

    Raises:
        MessageRefused: the message breaks a rule above (the reason says which); nothing else escapes.
    """
    if not is_device_id(device):
        raise MessageRefused("bad_device_id", f"the topic names {device[:80]!r}, not a device id")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise MessageRefused("too_large", f"{len(payload)} bytes, over {MAX_MESSAGE_BYTES}")
    try:
        document = from_json(payload, allow_inf_nan=False)
    except ValueError as error:  # also nesting past the parser's limit and invalid UTF-8
        raise MessageRefused("not_json", f"not JSON ({str(error)[:120]})") from None
    if isinstance(document, dict) and "device" in document and document["device"] != device:
        named = document["device"]
        raise MessageRefused("device_mismatch", f"names device {str(named)[:80]!r}" if isinstance(named, str)
                             else f"names a {type(named).__name__} as its device")
    try:
        return SCHEMAS[kind].model_validate(document).model_dump()
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'message'}: {item['msg']}"
                             for item in error.errors(include_url=False, include_input=False)[:3])
        raise MessageRefused("invalid", f"not a {kind} message ({problems[:300]})") from None


@functools.cache
def dropped_messages_counter() -> Counter:
    """``edgeloop_rollout_dropped_messages_total{device, reason}`` in the default registry, created once."""
    return Counter("edgeloop_rollout_dropped_messages", "device messages the rollout control plane dropped, by "
                   "device and reason", ["device", "reason"])


class DropCounts:
    """Dropped device messages per device and reason (thread-safe), mirrored in the Prometheus counter.

    The first drop of each (device, reason) is logged as a warning, the rest at debug level: a device
    flooding bad messages must not flood the log either.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}

    def add(self, device: str, reason: DropReason, detail: str, topic: str) -> None:
        label = device if is_device_id(device) else INVALID_DEVICE
        with self._lock:
            per_device = self._counts.setdefault(label, {})
            first = reason not in per_device
            per_device[reason] = per_device.get(reason, 0) + 1
        dropped_messages_counter().labels(device=label, reason=reason).inc()
        log.log(logging.WARNING if first else logging.DEBUG, "dropped a message on %s (%s): %s%s", topic[:200],
                reason, detail, "; further drops of this kind from this device are logged at debug level"
                if first else "")

    def as_dict(self) -> dict[str, dict[str, int]]:
        """Device -> reason -> messages dropped so far (a copy)."""
        with self._lock:
            return {device: dict(reasons) for device, reasons in sorted(self._counts.items())}
