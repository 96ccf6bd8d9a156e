"""The one device id rule, shared by the device side and the control plane.

A device id is an MQTT username and client id, a topic level (``fleet/<group>/status/<device>``), a field
in every sample file and a part of the file names the ingest service writes. So it is at most 64
characters: runs of letters and digits joined by single ``.``, ``_`` or ``-``. It never starts or ends
with a separator, never holds two in a row (so no ``--``, the separator of ``<device>--<file>``), and
never holds ``/``, ``+``, ``#``, spaces or anything else a topic, a path or a file name reads as structure.

The ingest service stores a device's upload as ``<device>--<upload name>``. An upload name follows the
same rule (so no ``/``, no ``..``, no ``--``) and ends in ``.npz``, so the first ``--`` of a stored name
always ends the device id: device ``site`` can never write a name that reads as device ``site--a``'s.
"""

from __future__ import annotations

import re
from typing import Annotated

from edge.schema import Rule

# runs of letters and digits joined by single separators; no look-arounds, so the control plane's pydantic (Rust
# regex) takes it too
DEVICE_ID_PATTERN = r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*$"
DEVICE_ID_MAX_LENGTH = 64
DEVICE_ID = re.compile(DEVICE_ID_PATTERN)
DEVICE_ID_RULE = ("1-64 letters and digits, optionally joined by single '.', '_' or '-' (no two in a row, none "
                  "first or last)")


def is_device_id(value: object) -> bool:
    """Whether ``value`` is a device id under the one rule (a non-string never is)."""
    return isinstance(value, str) and len(value) <= DEVICE_ID_MAX_LENGTH and DEVICE_ID.fullmatch(value) is not None


def check_device_id(value: str) -> str:
    """``value`` when it is a device id; otherwise a ``ValueError`` that names the rule (validation shows it)."""
    if not is_device_id(value):
        raise ValueError(f"device id {value!r} is not allowed: {DEVICE_ID_RULE}")
    return value


# a record field type (edge.schema) with the rule's own error message; the control plane's pydantic models use
# tasks.rollout.messages.DeviceId, the same check with this JSON schema for forms
DeviceId = Annotated[str, Rule(check=check_device_id)]
DEVICE_ID_JSON_SCHEMA = {"type": "string", "pattern": DEVICE_ID_PATTERN, "maxLength": DEVICE_ID_MAX_LENGTH}


UPLOAD_NAME_MAX_LENGTH = 132  # what edge.sampling.segments.file_name makes is 47 characters
UPLOAD_NAME = re.compile(r"^[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\.npz$")
UPLOAD_NAME_RULE = (f"at most {UPLOAD_NAME_MAX_LENGTH} characters: letters and digits, optionally joined by single "
                    "'.', '_' or '-', ending in '.npz' (no '/', '..' or '--')")
STORED_SEPARATOR = "--"


def is_upload_name(value: object) -> bool:
    """Whether ``value`` is a name a device may give an upload (see the module docstring)."""
    return (isinstance(value, str) and len(value) <= UPLOAD_NAME_MAX_LENGTH
            and UPLOAD_NAME.fullmatch(value) is not None)


def stored_upload_name(device: str, upload_name: str) -> str:
    """``<device>--<upload name>``: the one name the ingest service stores ``device``'s upload under."""
    if not is_device_id(device) or not is_upload_name(upload_name):
        raise ValueError(f"cannot store {upload_name!r} of {device!r}: a device id is {DEVICE_ID_RULE}; an "
                         f"upload name is {UPLOAD_NAME_RULE}")
    return f"{device}{STORED_SEPARATOR}{upload_name}"


def upload_owner(stored_name: str) -> str | None:
    """The device whose upload ``stored_name`` is, or None when the name is not one
    :func:`stored_upload_name` makes (the drift check quarantines those)."""
    device, separator, upload_name = stored_name.partition(STORED_SEPARATOR)
    return device if separator and is_device_id(device) and is_upload_name(upload_name) else None
