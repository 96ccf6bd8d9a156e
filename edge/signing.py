"""Ed25519 signatures over bundle manifests: devices hold only public keys.

``manifest.sig`` is JSON: ``{"algorithm": "ed25519", "key_id": "<16 hex>", "signature": "<base64>"}``;
the signature covers the exact bytes of ``manifest.json``. A device trusts every public key it is
configured with (several during a key rotation) and refuses a manifest signed by any other.

Whatever the bytes of ``manifest.sig`` are (too large, not UTF-8, not JSON, nested, a list, fields
missing, unknown or of the wrong type), verifying ends in :class:`BundleRefused`, never another
exception: a device counts it as a refusal and answers 4xx.

Devices verify through the OpenSSL that Python's ``ssl`` module already loaded (:class:`PublicKey`).
``cryptography``'s Ed25519 verify is OpenSSL's ``EVP_DigestVerify`` too, but in a second, statically linked
OpenSSL whose Rust binding alone held 6.4 MB of a 256 MB device's memory and 12 MB of its image; this calls the
same function in the ``libcrypto`` Python's ``_ssl`` links (found through that module, never by searching paths),
so a device carries one OpenSSL, patched with the system's. Only the control plane signs, with a
``cryptography`` private key (imported there, never on a device).
"""

from __future__ import annotations

import base64
import binascii
import ctypes
import hashlib
import json
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from edge.errors import BundleRefused, ConfigError
from edge.schema import Record, SchemaError, setting, where

if TYPE_CHECKING:  # the control plane's signing key type; a device never imports cryptography
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")  # SEQUENCE { SEQUENCE { OID 1.3.101.112 } BIT STRING }
EVP_PKEY_ED25519 = 1087  # NID_ED25519
KEY_BYTES = 32
PEM_BEGIN, PEM_END = "-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----"


class InvalidSignature(Exception):
    """The signature does not verify under the key."""


class OpenSslUnavailable(RuntimeError):
    """No OpenSSL with Ed25519 could be loaded."""


@cache
def _libcrypto() -> ctypes.CDLL:
    """The ``libcrypto`` of Python's ``_ssl`` module: a handle on ``_ssl`` resolves symbols in its dependencies."""
    import _ssl

    try:
        library = ctypes.CDLL(_ssl.__file__)
        for name, result, arguments in (
                ("EVP_PKEY_new_raw_public_key", ctypes.c_void_p,
                 (ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t)),
                ("EVP_PKEY_free", None, (ctypes.c_void_p,)),
                ("EVP_MD_CTX_new", ctypes.c_void_p, ()),
                ("EVP_MD_CTX_free", None, (ctypes.c_void_p,)),
                ("EVP_DigestVerifyInit", ctypes.c_int,
                 (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)),
                ("EVP_DigestVerify", ctypes.c_int,
                 (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)),
                ("ERR_clear_error", None, ())):
            function = getattr(library, name)
            function.restype, function.argtypes = result, arguments
    except (OSError, AttributeError) as error:  # a Python without a shared OpenSSL 1.1.1+ behind its ssl module
        raise OpenSslUnavailable(f"Python's ssl module does not expose OpenSSL's Ed25519 ({error})") from None
    return library


def _cryptography_key(raw: bytes):
    """``cryptography``'s key, for a Python whose ``_ssl`` does not expose its OpenSSL (statically linked builds,
    such as python-build-standalone): the control plane has ``cryptography``; a device image never needs it."""
    try:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    except ImportError:
        raise OpenSslUnavailable("Python's ssl module does not expose OpenSSL's Ed25519 and cryptography is not "
                                 "installed") from None
    return Ed25519PublicKey.from_public_bytes(raw)


class PublicKey:
    """An Ed25519 public key (32 raw bytes) that verifies detached signatures."""

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_BYTES:
            raise ValueError(f"an Ed25519 public key has {KEY_BYTES} bytes, not {len(raw)}")
        self.raw, self._key, self._fallback = bytes(raw), None, None
        try:
            self._library = library = _libcrypto()  # kept: __del__ may run at interpreter shutdown
        except OpenSslUnavailable:
            self._library, self._fallback = None, _cryptography_key(self.raw)
            return
        self._key = library.EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, None, self.raw, KEY_BYTES)
        library.ERR_clear_error()
        if not self._key:
            raise ValueError("OpenSSL refused the key's 32 bytes as an Ed25519 public key")

    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        """The key in a PEM ``PUBLIC KEY`` document; ``ValueError`` for anything else (another algorithm too)."""
        try:
            text = data.decode("ascii").strip()
        except UnicodeDecodeError:
            raise ValueError("not PEM (not ASCII text)") from None
        if not (text.startswith(PEM_BEGIN) and text.endswith(PEM_END)):
            raise ValueError(f"not a PEM public key (no {PEM_BEGIN} ... {PEM_END})")
        body = "".join(text[len(PEM_BEGIN):-len(PEM_END)].split())
        try:
            der = base64.b64decode(body, validate=True)
        except (ValueError, binascii.Error) as error:
            raise ValueError(f"the PEM body is not base64 ({error})") from None
        if len(der) != len(SPKI_PREFIX) + KEY_BYTES or not der.startswith(SPKI_PREFIX):
            raise ValueError("not an Ed25519 key (its SubjectPublicKeyInfo names another algorithm or size)")
        return cls(der[len(SPKI_PREFIX):])

    def verify(self, signature: bytes, message: bytes) -> None:
        """Return if ``signature`` is this key's over ``message``; :class:`InvalidSignature` otherwise."""
        library = self._library
        if library is None:
            from cryptography.exceptions import InvalidSignature as Invalid

            try:
                return self._fallback.verify(signature, message)
            except Invalid:
                raise InvalidSignature("the Ed25519 signature does not verify") from None
        context = library.EVP_MD_CTX_new()
        if not context:
            raise MemoryError("OpenSSL could not allocate a digest context")
        try:
            verified = (library.EVP_DigestVerifyInit(context, None, None, None, self._key) == 1
                        and library.EVP_DigestVerify(context, signature, len(signature), message, len(message)) == 1)
        finally:
            library.EVP_MD_CTX_free(context)
            library.ERR_clear_error()  # never leave an error behind for the ssl module to report as its own
        if not verified:
            raise InvalidSignature("the Ed25519 signature does not verify")

    def __del__(self) -> None:
        key, self._key = getattr(self, "_key", None), None
        if key:
            self._library.EVP_PKEY_free(key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other.raw == self.raw

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.raw.hex()[:16]}...)"


PUBLIC_KEY_SUFFIXES = (".pub", ".pem")
MAX_SIGNATURE_BYTES = 4096  # a record is about 150 bytes; anything far larger is not one


class SignatureRecord(Record):
    """``manifest.sig``: known fields only, each a string (no coercion), of bounded length."""

    algorithm: str = setting(max_length=32)
    key_id: str = setting(min_length=1, max_length=64)
    signature: str = setting(max_length=256)


def key_id(public_key: PublicKey | Ed25519PublicKey) -> str:
    """A short stable name for a public key: the first 16 hex digits of the sha256 of its raw bytes."""
    raw = public_key.raw if isinstance(public_key, PublicKey) else public_key.public_bytes_raw()
    return hashlib.sha256(raw).hexdigest()[:16]


def read_public_key(path: Path) -> PublicKey:
    """An Ed25519 public key from a PEM file (``edgeloop keys generate`` writes ``<name>.pub``)."""
    try:
        return PublicKey.from_pem(path.read_bytes())
    except OSError as error:
        raise ConfigError(f"public key {path} is unreadable ({error})") from error
    except ValueError as error:
        raise ConfigError(f"public key {path} is not an Ed25519 PEM public key ({error})") from error
    except OpenSslUnavailable as error:
        raise ConfigError(f"cannot verify signatures here: {error}") from error


def load_public_keys(paths: Iterable[Path]) -> dict[str, PublicKey]:
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
        return SignatureRecord.from_json(signature_bytes)
    except SchemaError as error:
        problems = "; ".join(f"{where(location)}: {message}" for location, message in error.problems[:3])
        raise BundleRefused("unsigned", f"manifest.sig is not a readable signature record ({problems})") from None


def verify_manifest(manifest_bytes: bytes, signature_bytes: bytes | None, keys: dict[str, PublicKey]) -> str:
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
