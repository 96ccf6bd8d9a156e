"""Fetch a rollout's bundle to a local file: http(s) with a timeout and retries, or ``file://``.

With the device's TLS settings only ``https://`` (or a local ``file://``) is fetched, the server verified
against the fleet CA and the device's certificate presented; a plain-HTTP URL, or a redirect to one,
fails as ``insecure_url`` before a byte is read, and a server that fails verification as ``tls_failed``.

Retries back off exponentially with full jitter (a fleet whose bundle server comes back must not
arrive all at once); an answer that cannot change on retry (404, 403...) fails at once. The sha256
is computed while the bytes stream to disk, so the caller compares it without reading the file again.
"""

from __future__ import annotations

import hashlib
import logging
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import httpx

from edge.errors import EdgeError
from edge.retry import backoff_delay
from edge.tls import ClientTls, PlainHttpRefused, http_client

log = logging.getLogger(__name__)
RETRYABLE_HTTP_STATUSES = (408, 425, 429, 500, 502, 503, 504)
CHUNK_BYTES = 1 << 20


class RolloutFailed(EdgeError):
    """A rollout this device could not carry out; ``reason`` is the short code its status reports."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


class _Retryable(Exception):
    """A fetch failure worth another attempt (timeout, 408/425/429, 5xx)."""


def _copy_stream(chunks: BinaryIO | httpx.Response, target: BinaryIO, max_bytes: int, url: str) -> str:
    digest, total = hashlib.sha256(), 0
    iterator = chunks.iter_bytes(CHUNK_BYTES) if isinstance(chunks, httpx.Response) else \
        iter(lambda: chunks.read(CHUNK_BYTES), b"")
    for chunk in iterator:
        total += len(chunk)
        if total > max_bytes:
            raise RolloutFailed("too_large", f"{url} is larger than the store accepts ({max_bytes} bytes)")
        digest.update(chunk)
        target.write(chunk)
    return digest.hexdigest()


def _fetch_file(url: str, destination: Path, max_bytes: int) -> str:
    source = Path(unquote(urlsplit(url).path))
    try:
        with open(source, "rb") as handle, open(destination, "wb") as target:
            return _copy_stream(handle, target, max_bytes, url)
    except OSError as error:
        raise RolloutFailed("fetch_failed", f"cannot read {url}: {error}") from error


def _fetch_http_once(client: httpx.Client, url: str, destination: Path, max_bytes: int) -> str:
    try:
        with client.stream("GET", url) as response:
            if response.status_code in RETRYABLE_HTTP_STATUSES:
                raise _Retryable(f"HTTP {response.status_code}")
            if not response.is_success:
                raise RolloutFailed("fetch_failed", f"GET {url} answered HTTP {response.status_code}; the bundle "
                                                    "URL or this device's access to it is wrong")
            with open(destination, "wb") as target:
                return _copy_stream(response, target, max_bytes, url)
    except PlainHttpRefused as error:
        raise RolloutFailed("insecure_url", str(error)) from None
    except httpx.ConnectError as error:
        if _caused_by(error, ssl.SSLCertVerificationError):  # not a server that is away: no retry
            raise RolloutFailed("tls_failed", f"GET {url}: the server's certificate does not verify against the "
                                f"fleet CA or does not name its host ({error})") from None
        raise _Retryable(f"{type(error).__name__}: {error}") from error
    except httpx.HTTPError as error:
        raise _Retryable(f"{type(error).__name__}: {error}") from error


def _caused_by(error: BaseException, kind: type[BaseException]) -> bool:
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, kind):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def fetch_bundle(url: str, destination: Path, max_bytes: int, timeout_s: float = 30.0, attempts: int = 4,
                 initial_backoff_s: float = 1.0, max_backoff_s: float = 30.0,
                 sleep: Callable[[float], object] = time.sleep, rng: random.Random | None = None,
                 tls: ClientTls | None = None) -> str:
    """Download ``url`` to ``destination`` and return the sha256 of what was written.

    Raises :class:`RolloutFailed` (``fetch_failed``, ``too_large``, ``insecure_url``, ``tls_failed``) once the
    attempts are spent or at the first answer a retry cannot change.
    """
    scheme = urlsplit(url).scheme
    if tls is not None and scheme not in ("https", "file"):
        raise RolloutFailed("insecure_url", f"bundle URL {url!r} is not https: this device uses TLS and never "
                                            "fetches over the network in the clear")
    if scheme == "file":
        return _fetch_file(url, destination, max_bytes)
    if scheme not in ("http", "https"):
        raise RolloutFailed("fetch_failed", f"bundle URL {url!r}: only http, https and file URLs are fetched")
    rng = rng or random.Random()
    with http_client(tls, timeout_s, follow_redirects=True) as client:
        for attempt in range(1, attempts + 1):
            try:
                return _fetch_http_once(client, url, destination, max_bytes)
            except _Retryable as error:
                if attempt == attempts:
                    raise RolloutFailed("fetch_failed", f"GET {url} failed {attempts} times, last: {error}") from None
                delay = backoff_delay(attempt, initial_backoff_s, max_backoff_s, rng)
                log.warning("fetching %s failed (%s); retry %d/%d in %.1f s", url, error, attempt, attempts - 1, delay)
                sleep(delay)
    raise AssertionError("unreachable: the loop returns or raises")
