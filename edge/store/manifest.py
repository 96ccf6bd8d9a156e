"""The manifest of a model bundle: what a device installs, described and signed by the control plane.

A bundle is ``manifest.json`` + ``manifest.sig`` (a detached Ed25519 signature over the manifest's
exact bytes, see :mod:`edge.signing`) + the payload files the manifest lists with their sha256 and
size: the model file(s), their sidecars and a sample input for the health check. Nothing outside the
list may be in a bundle, and nothing on the list may be missing.

:func:`parse_manifest` turns any other bytes (over :data:`MAX_MANIFEST_BYTES`, not UTF-8, not JSON,
nested, unknown fields, wrong types) into a ``malformed`` :class:`BundleRefused`, never another exception.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Annotated, Any, Literal

from edge.errors import BundleRefused
from edge.schema import Record, Rule, SchemaError, setting, where

MANIFEST_FILE = "manifest.json"
SIGNATURE_FILE = "manifest.sig"
MANIFEST_SCHEMA = "edgeloop.manifest/1"
MAX_MANIFEST_BYTES = 2**20  # a manifest with two models' sidecars is about 3 KB
SAFE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a plain file or version name: no paths, no dot-files
VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a bundle version: v12, 1.4.2, 2026-05-01.rc1
PROVIDER_NAME = r"^[A-Za-z][A-Za-z0-9]{0,62}ExecutionProvider$"
ModelRole = Literal["primary", "large"]  # large: the cascade's second stage


def _provider_name(provider: str) -> str:
    if not re.fullmatch(PROVIDER_NAME, provider):
        raise ValueError(f"{provider[:80]!r} is not an ONNX Runtime execution provider name")
    return provider


ProviderName = Annotated[str, Rule(check=_provider_name)]


class PayloadFile(Record):
    name: str = setting(pattern=SAFE_NAME)
    sha256: str = setting(pattern=r"^[0-9a-f]{64}$")
    size_bytes: int = setting(ge=0)


class ModelEntry(Record):
    file: str = setting(pattern=SAFE_NAME)
    role: ModelRole
    runtime: Literal["tflite", "onnx"]
    sidecar: dict[str, Any]  # the model file's sidecar as written by the convert stage


class SampleCheck(Record):
    """A real input batch (``.npy``) and what the primary model must make of it on any device."""

    file: str = setting(pattern=SAFE_NAME)
    output_shape: list[int]
    output_dtype: str = "float32"
    expected_labels: list[int]
    min_label_agreement: float = setting(0.9, ge=0.0, le=1.0)  # int8 numerics differ a little between CPUs

    def problems(self) -> Iterator[str]:
        if len(self.output_shape) != 2 or len(self.expected_labels) != self.output_shape[0]:
            yield (f"expected_labels has {len(self.expected_labels)} entries for an output of shape "
                   f"{self.output_shape} (one per sample row)")


class RuntimeSettings(Record):
    """How the device runs the primary model when it is not the runtime's default: the configuration the
    benchmark measured best on the device's class (LiteRT without XNNPACK, an ONNX Runtime provider list).
    A provider the device's build lacks is left out when loading: the CPU provider is always the last resort."""

    config: str = setting(pattern=SAFE_NAME)  # the benchmark configuration's name (devices.yaml runner), for reports
    xnnpack: bool = True
    onnx_providers: list[ProviderName] = setting(default_factory=lambda: ["CPUExecutionProvider"], min_length=1,
                                                 max_length=4)


class Manifest(Record):
    schema_id: Literal["edgeloop.manifest/1"] = setting(MANIFEST_SCHEMA, alias="schema")
    version: str = setting(pattern=VERSION_PATTERN)
    model_name: str
    mlflow_version: str
    alias: str | None = None
    variant: str
    created_at: str
    labels: list[str]
    input_shape: list[int]
    data_version: str
    git_commit: str
    params_hash: str
    models: list[ModelEntry] = setting(min_length=1, max_length=2)
    sample: SampleCheck
    files: list[PayloadFile] = setting(min_length=1)
    runtime_options: RuntimeSettings | None = None  # left out of the bytes when None (older devices' schema)

    def problems(self) -> Iterator[str]:
        names = [entry.name for entry in self.files]
        if len(set(names)) != len(names):
            yield "files lists a name twice"
        if names.count(MANIFEST_FILE) or names.count(SIGNATURE_FILE):
            yield f"files may not list {MANIFEST_FILE} or {SIGNATURE_FILE}"
        for needed in [model.file for model in self.models] + [self.sample.file]:
            if needed not in names:
                yield f"{needed} is used but not listed in files"
        roles = [model.role for model in self.models]
        if roles.count("primary") != 1 or len(set(roles)) != len(roles):
            yield f"models need exactly one primary and at most one large model, got {roles}"

    def model(self, role: ModelRole) -> ModelEntry | None:
        return next((entry for entry in self.models if entry.role == role), None)

    @property
    def primary(self) -> ModelEntry:
        primary = self.model("primary")
        assert primary is not None  # enforced by problems()
        return primary

    def to_bytes(self) -> bytes:
        """The canonical bytes that are signed and shipped (sorted keys, so rebuilding gives the same bytes)."""
        content = self.to_dict()
        if self.runtime_options is None:
            del content["runtime_options"]
        return (json.dumps(content, indent=2, sort_keys=True) + "\n").encode()


def parse_manifest(content: bytes) -> Manifest:
    """Parse manifest bytes; anything but a valid edgeloop manifest is a ``malformed`` refusal."""
    if len(content) > MAX_MANIFEST_BYTES:
        raise BundleRefused("malformed", f"{MANIFEST_FILE} has {len(content)} bytes, over {MAX_MANIFEST_BYTES}")
    try:
        return Manifest.from_json(content)
    except SchemaError as error:  # every problem of the bytes, JSON or schema (edge.schema bounds the nesting)
        problems = "; ".join(f"{where(location) if location else 'manifest'}: {message}"
                             for location, message in error.problems[:5])
        raise BundleRefused("malformed", f"{MANIFEST_FILE} is not a valid edgeloop manifest ({problems})") from error
