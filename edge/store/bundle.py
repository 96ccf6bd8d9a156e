"""Unpack and verify a model bundle on the device, refusing anything not exactly as signed.

A bundle arrives as a tar archive (optionally gzip-compressed) or a folder. Only plain files with
plain names are accepted (no paths, links or devices), within a size limit. Verification checks the
Ed25519 signature over ``manifest.json`` first, then that the payload is exactly the manifest's list:
a missing or short file is ``truncated``, a changed one ``tampered``, an extra one ``unexpected_file``.
"""

from __future__ import annotations

import gzip
import io
import re
import shutil
import tarfile
import zlib
from pathlib import Path
from typing import BinaryIO

from edge.errors import BundleRefused
from edge.files import sha256_file
from edge.signing import MAX_SIGNATURE_BYTES, PublicKey, verify_manifest
from edge.store.manifest import MANIFEST_FILE, MAX_MANIFEST_BYTES, SAFE_NAME, SIGNATURE_FILE, Manifest, parse_manifest

MAX_MEMBERS = 64
GZIP_MAGIC = b"\x1f\x8b"
HEADER_ALLOWANCE = MAX_MEMBERS * 4096 + 2**20  # tar headers and padding on top of the files' bytes


def _check_name(name: str) -> None:
    if not re.fullmatch(SAFE_NAME, name):
        raise BundleRefused("malformed", f"bundle member {name!r} is not a plain file name (no folders or links)")


class _LimitedReader(io.RawIOBase):
    """A read-only stream that refuses to yield more than ``limit`` bytes: decompression and tar
    headers (pax records are read whole into memory) stay bounded before any signature is checked."""

    def __init__(self, stream: BinaryIO, limit: int, closes: tuple[BinaryIO, ...] = ()) -> None:
        self._stream, self._left, self._closes = stream, limit, (stream, *closes)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        for stream in self._closes:
            stream.close()
        super().close()

    def readinto(self, buffer) -> int:
        count = self._stream.readinto(buffer) if hasattr(self._stream, "readinto") else 0
        self._left -= count
        if self._left < 0:
            raise BundleRefused("too_large", "the bundle unpacks to more than the store's max_bundle_bytes")
        return count


def _open_stream(bundle: Path, limit: int) -> BinaryIO:
    raw = open(bundle, "rb")
    if raw.read(2) == GZIP_MAGIC:
        raw.seek(0)
        return io.BufferedReader(_LimitedReader(gzip.GzipFile(fileobj=raw), limit, closes=(raw,)))
    raw.seek(0)
    return io.BufferedReader(_LimitedReader(raw, limit))


def _unpack_tar(bundle: Path, destination: Path, max_bytes: int) -> None:
    if bundle.stat().st_size > max_bytes:
        raise BundleRefused("too_large", f"{bundle.name} is larger than the store's max_bundle_bytes ({max_bytes})")
    total = 0
    try:
        with _open_stream(bundle, max_bytes + HEADER_ALLOWANCE) as stream, \
                tarfile.open(fileobj=stream, mode="r|") as archive:  # a stream: members read once, in order
            for count, member in enumerate(archive, start=1):
                if count > MAX_MEMBERS:
                    raise BundleRefused("malformed", f"bundle has more than {MAX_MEMBERS} members")
                _check_name(member.name)
                if not member.isfile():
                    raise BundleRefused("malformed", f"bundle member {member.name!r} is not a regular file")
                total += member.size
                if total > max_bytes:
                    raise BundleRefused("too_large", f"bundle unpacks to more than {max_bytes} bytes "
                                                     "(the store's max_bundle_bytes)")
                source = archive.extractfile(member)
                assert source is not None  # regular files always have content
                with source, open(destination / member.name, "xb") as target:
                    shutil.copyfileobj(source, target)
    except RecursionError as error:  # chained long-name headers
        raise BundleRefused("malformed", f"{bundle.name} has nested tar headers") from error
    except (tarfile.TarError, EOFError, OSError, UnicodeError, zlib.error) as error:
        if isinstance(error, FileExistsError):
            raise BundleRefused("malformed", f"bundle holds {Path(error.filename).name!r} twice") from error
        raise BundleRefused("truncated", f"{bundle.name} is not a complete tar archive ({error}); "
                                         "download it again") from error


def _copy_folder(bundle: Path, destination: Path, max_bytes: int) -> None:
    total = 0
    for path in sorted(bundle.iterdir()):
        _check_name(path.name)
        if path.is_symlink() or not path.is_file():
            raise BundleRefused("malformed", f"bundle entry {path.name!r} is not a regular file")
        total += path.stat().st_size
        if total > max_bytes:
            raise BundleRefused("too_large", f"bundle holds more than {max_bytes} bytes")
        shutil.copyfile(path, destination / path.name)


def unpack(bundle: Path, destination: Path, max_bytes: int) -> None:
    """Copy the files of ``bundle`` (tar archive or folder) into the empty folder ``destination``."""
    if bundle.is_dir():
        _copy_folder(bundle, destination, max_bytes)
    elif bundle.is_file():
        _unpack_tar(bundle, destination, max_bytes)
    else:
        raise BundleRefused("malformed", f"bundle {bundle} does not exist")


def _read_at_most(path: Path, limit: int) -> bytes:
    """``path``'s bytes, or only its first ``limit + 1`` when it is larger: enough for the parser to refuse it
    without a huge file ever being read whole."""
    with open(path, "rb") as stream:
        return stream.read(limit + 1)


def verify_folder(folder: Path, keys: dict[str, PublicKey]) -> Manifest:
    """Check the signature and every payload file of an unpacked bundle; return its manifest."""
    try:
        return _verify_folder(folder, keys)
    except OSError as error:  # a file vanished or became unreadable while we read it
        raise BundleRefused("truncated", f"{folder.name}: a file could not be read ({error})") from error


def _verify_folder(folder: Path, keys: dict[str, PublicKey]) -> Manifest:
    manifest_path, signature_path = folder / MANIFEST_FILE, folder / SIGNATURE_FILE
    if not manifest_path.is_file():
        raise BundleRefused("malformed", f"the bundle has no {MANIFEST_FILE}")
    manifest_bytes = _read_at_most(manifest_path, MAX_MANIFEST_BYTES)
    verify_manifest(manifest_bytes, _read_at_most(signature_path, MAX_SIGNATURE_BYTES)
                    if signature_path.is_file() else None, keys)
    manifest = parse_manifest(manifest_bytes)
    listed = {entry.name: entry for entry in manifest.files}
    present = {path.name for path in folder.iterdir()} - {MANIFEST_FILE, SIGNATURE_FILE}
    if missing := sorted(set(listed) - present):
        raise BundleRefused("truncated", f"files listed in the manifest are missing: {', '.join(missing)}")
    if extra := sorted(present - set(listed)):
        raise BundleRefused("unexpected_file", f"files not in the signed manifest: {', '.join(extra)}")
    for name, entry in listed.items():
        size = (folder / name).stat().st_size
        if size < entry.size_bytes:
            raise BundleRefused("truncated", f"{name} has {size} of its {entry.size_bytes} bytes")
        if size != entry.size_bytes or sha256_file(folder / name) != entry.sha256:
            raise BundleRefused("tampered", f"{name} does not match its sha256 in the signed manifest")
    return manifest
