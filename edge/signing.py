"""Ed25519 signatures over bundle manifests: devices hold only public keys.

``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}``;
the signature covers the exact bytes of ``manifest.json``. A device trusts every public key it is
configured with (several during a key rotation) and refuses a manifest signed by any other.

Whatever the bytes of ``manifest.sig`` are (too large, not UTF-8, not JSON, nested, a list, fields
missing, unknown or of the wrong type), verifying ends in :class:`BundleRefused`, never another
exception: a device counts it as a refusal and answers 4xx.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Annotated

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from edge.errors import BundleRefused, ConfigError

PUBLIC_KEY_SUFFIXES = (".pub", ".pem")
MAX_SIGNATURE_BYTES = 4096  # a record is about 150 bytes; anything far larger is not one


class SignatureRecord(BaseModel):
    """``manifest.sig``: known fields only, each a string (no coercion), of bounded length."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)
    algorithm: Annotated[str, StringConstraints(max_length=32)]
    key_id: Annotated[str, StringConstraints(min_length=1, max_length=64)]
    signature: Annotated[str, StringConstraints(max_length=256)]


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short stable name for a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def read_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (``edgeloop keys generate`` writes ``<name>.pub``)."""
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as error:
        raise ConfigError(f"public key {path} is unreadable or not PEM ({error})") from error
    if not isinstance(key, Ed25519PublicKey):
        raise ConfigError(f"public key {path} is not an Ed25519 key ({type(key).__name__})")
    return key


def load_public_keys(paths: Iterable[Path]) -> dict[str, Ed25519PublicKey]:
    """Every trusted key by key id; a folder contributes its ``*.pub`` / ``*.pem`` files."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.suffix in PUBLIC_KEY_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"public key path {path} does not exist")
    keys = {key_id(key): key for key in map(read_public_key, files)}
    if not keys:
        raise ConfigError("no public keys configured: a device needs at least one to verify bundles "
                          "(--public-keys or EDGELOOP_PUBLIC_KEYS)")
    return keys


def sign_manifest(manifest_bytes: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The ``manifest.sig`` content for ``manifest_bytes``."""
    record = {"algorithm": "ed25519", "key_id": key_id(private_key.public_key()),
              "signature": base64.b64encode(private_key.sign(manifest_bytes)).decode()}
    return (json.dumps(record, sort_keys=True) + "\n").encode()


def parse_signature(signature_bytes: bytes | None) -> SignatureRecord:
    """The record in ``manifest.sig``; an ``unsigned`` :class:`BundleRefused` for anything else."""
    if signature_bytes is None:
        raise BundleRefused("unsigned", "the bundle has no manifest.sig: unsigned bundles are never installed")
    if len(signature_bytes) > MAX_SIGNATURE_BYTES:
        raise BundleRefused("unsigned", f"manifest.sig has {len(signature_bytes)} bytes, over {MAX_SIGNATURE_BYTES}: "
                                        "not a signature record")
    try:
        return SignatureRecord.model_validate_json(signature_bytes)
    except ValidationError as error:
        problems = "; ".join(f"{'.'.join(map(str, item['loc'])) or 'record'}: {item['msg']}"
                             for item in error.errors()[:3])
        raise BundleRefused("unsigned", f"manifest.sig is not a readable signature record ({problems})") from None


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes | None, keys: dict[str, Ed25519PublicKey]) -> str:
    """Check the detached signature; return the signing key's id or raise :class:`BundleRefused`."""
    record = parse_signature(signature_bytes)
    if record.algorithm != "ed25519":
        raise BundleRefused("unsigned", f"manifest.sig uses {record.algorithm!r}; only ed25519 is accepted")
    signer = record.key_id
    try:
        signature = base64.b64decode(record.signature, validate=True)
    except (ValueError, binascii.Error) as error:
        raise BundleRefused("unsigned", f"manifest.sig's signature is not base64 ({error})") from None
    key = keys.get(signer)
    if key is None:
        raise BundleRefused("unknown_key", f"the manifest is signed by key {signer}, which this device does not "
                                           f"trust (trusted: {', '.join(sorted(keys))}); install its public key")
    try:
        key.verify(signature, manifest_bytes)
    except InvalidSignature as error:
        raise BundleRefused("bad_signature", f"the signature by key {signer} does not match the manifest: "
                                             "it was altered after signing") from error
    return signer
