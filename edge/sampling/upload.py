"""Ship closed sample files to the control plane; delete each only after the receiver confirmed it.

A target's ``send(path)`` returns only when the file is safely stored on the other side and raises
:class:`edge.errors.UploadError` otherwise. :class:`Uploader` sends the oldest file first and stops a
pass at the first failure (order is age, and an outage fails every file alike), then retries with
exponential backoff and full jitter, so a fleet does not hammer an ingest service that comes back.
A file the receiver refuses outright (malformed, too large) moves to the store's ``rejected/`` folder
instead of blocking the queue forever.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol
from urllib.parse import urlsplit

from edge.errors import SampleStoreError, UploadError
from edge.files import atomic_write_bytes, sha256_file
from edge.retry import backoff_delay
from edge.sampling.store import SampleStore
from edge.tls import ClientTls, require_https

LOGGER = logging.getLogger(__name__)
# the file itself is refused (too large, malformed, its name taken by other bytes): resending cannot succeed
PERMANENT_HTTP_STATUSES = (409, 413, 422)


class UploadTarget(Protocol):
    def send(self, path: Path) -> None:
        """Store ``path`` on the other side; return only once it is confirmed, else raise UploadError."""


class FolderTarget:
    """Copies files into a folder (a mounted share, the embedded default): tmp + fsync + atomic rename.

    With ``device_id`` the copy is named ``<device>--<file>`` as the ingest endpoint names it, so many
    devices can share one folder and the drift check knows whose file it is.
    """

    def __init__(self, directory: Path, device_id: str | None = None) -> None:
        self.directory = Path(directory)
        self.prefix = f"{device_id}--" if device_id else ""

    def send(self, path: Path) -> None:
        target = self.directory / f"{self.prefix}{path.name}"
        try:
            expected = sha256_file(path)
            if target.is_file() and sha256_file(target) == expected:
                return  # a retry after a lost confirmation: already there
            atomic_write_bytes(target, path.read_bytes())
            if sha256_file(target) != expected:  # read back: what a later reader will see
                raise UploadError(f"copy of {path.name} in {self.directory} does not match the original")
        except OSError as error:
            raise UploadError(f"cannot copy {path.name} to {self.directory}: {error}") from error


class HttpTarget:
    """POSTs files to the ingest endpoint (``edgeloop ingest serve``), authenticated per device: by its client
    certificate over mutual TLS (``tls``: https only, never a plain-HTTP fallback) or by its token.

    Confirmed only by a 2xx answer that echoes the file's sha256; 409, 413 and 422 are permanent refusals;
    a redirect is never followed. One connection per file, on the standard library's ``http.client``: a small
    device's service does not carry an HTTP client library for one POST a minute.
    """

    def __init__(self, url: str, device_id: str, token: str | None, timeout_s: float = 10.0,
                 tls: ClientTls | None = None) -> None:
        if tls is not None:
            require_https(url, "ingest URL")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UploadError(f"ingest URL {url!r} is not an http(s) URL", permanent=True)
        self.url, self.device_id, self._token, self._timeout_s = url, device_id, token, timeout_s
        self._parts = parts
        self._context = (tls.context() if tls is not None else ssl.create_default_context()) \
            if parts.scheme == "https" else None

    def _connection(self) -> http.client.HTTPConnection:
        host, port = self._parts.hostname, self._parts.port
        if self._context is not None:
            return http.client.HTTPSConnection(host, port, timeout=self._timeout_s, context=self._context)
        return http.client.HTTPConnection(host, port, timeout=self._timeout_s)

    def _post(self, body: bytes, headers: dict[str, str]) -> tuple[int, bytes]:
        target = self._parts.path or "/"
        if self._parts.query:
            target += f"?{self._parts.query}"
        connection = self._connection()
        try:
            connection.request("POST", target, body=body, headers=headers)
            response = connection.getresponse()
            return response.status, response.read(1 << 20)
        finally:
            connection.close()

    def send(self, path: Path) -> None:
        digest = sha256_file(path)
        headers = {"X-Edgeloop-Device": self.device_id, "X-Content-SHA256": digest, "X-Edgeloop-Filename": path.name,
                   "Content-Type": "application/octet-stream"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        try:
            status, body = self._post(path.read_bytes(), headers)
        except (http.client.HTTPException, OSError) as error:  # OSError: refused, unreachable, TLS, timeout
            raise UploadError(f"ingest endpoint {self.url} did not answer ({type(error).__name__}: {error})") from error
        if not 200 <= status < 300:
            hint = " (check this device's token)" if status in (401, 403) else ""
            raise UploadError(f"ingest endpoint refused {path.name}: HTTP {status} "
                              f"{body[:300].decode(errors='replace')}{hint}",
                              permanent=status in PERMANENT_HTTP_STATUSES)
        try:
            echoed = json.loads(body).get("sha256")
        except (ValueError, AttributeError):
            echoed = None
        if echoed != digest:
            raise UploadError(f"ingest endpoint answered {status} for {path.name} without "
                              "confirming its sha256; will retry")

    def close(self) -> None:
        """Nothing to release: each file opens and closes its own connection."""

    def __enter__(self) -> HttpTarget:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Uploader:
    """Sends the store's closed files to ``target`` in a background thread, oldest first.

    Metrics for scrapes: ``uploaded_files``, ``uploaded_records``, ``failed_attempts``, ``rejected_files``,
    ``backlog_files``, ``backlog_bytes``, ``paused_now``, ``consecutive_failures`` (0: healthy) and
    ``last_error`` (the most recent failure, kept after recovery for diagnosis). ``paused`` (e.g. the thermal
    guard at its hard limit) is asked before every file. The loop also closes segments that reached the
    store's age limit, so a quiet device still ships its samples.
    """

    def __init__(self, store: SampleStore, target: UploadTarget, paused: Callable[[], bool] = lambda: False,
                 initial_backoff_s: float = 1.0, max_backoff_s: float = 300.0, poll_interval_s: float = 5.0,
                 seed: int | None = None) -> None:
        if not 0 < initial_backoff_s <= max_backoff_s or poll_interval_s <= 0:
            raise UploadError(f"need 0 < initial_backoff_s ({initial_backoff_s}) <= max_backoff_s "
                              f"({max_backoff_s}) and poll_interval_s ({poll_interval_s}) > 0")
        self.store = store
        self.target = target
        self.paused = paused
        self.initial_backoff_s = initial_backoff_s
        self.max_backoff_s = max_backoff_s
        self.poll_interval_s = poll_interval_s
        self.uploaded_files = 0
        self.uploaded_records = 0
        self.failed_attempts = 0
        self.consecutive_failures = 0
        self.rejected_files = 0
        self.last_error: str | None = None
        self.paused_now = False
        self._rng = random.Random(seed)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def backlog_files(self) -> int:
        return self.store.closed_count

    @property
    def backlog_bytes(self) -> int:
        return self.store.closed_bytes

    def upload_pending(self) -> int:
        """One pass over the closed files, oldest first, stopping at the first failure; returns files sent."""
        sent = 0
        for path in self.store.closed_files():
            if self._stop.is_set() or self._check_paused():
                break
            with self.store.uploading(path) as present:
                if not present:  # evicted by the budget since the listing
                    continue
                records = self.store.records_in(path)
                try:
                    self.target.send(path)
                except UploadError as error:
                    if error.permanent:
                        self._reject(path, error)
                        continue
                    self._failed(error)
                    break
                self.store.remove(path)  # still marked in flight: the budget cannot count it as dropped
            self._succeeded(records)
            sent += 1
        return sent

    def next_delay_s(self) -> float:
        """Seconds until the next pass: the poll interval, or full-jitter backoff after failures.

        The backoff cap doubles per consecutive failure up to ``max_backoff_s``; the delay is drawn
        uniformly below it, which spreads a fleet's retries after an outage.
        """
        if not self.consecutive_failures:
            return self.poll_interval_s
        return backoff_delay(self.consecutive_failures, self.initial_backoff_s, self.max_backoff_s, self._rng)

    def run_once(self) -> float:
        """Rotate an old segment, upload what is pending; returns the delay before the next pass."""
        try:
            self.store.maybe_rotate()
        except (OSError, SampleStoreError) as error:  # a full disk must not kill the loop that frees it
            LOGGER.warning("could not close the open sample segment: %s", error)
        if not self._check_paused():
            self.upload_pending()
        return self.next_delay_s()

    def start(self) -> None:
        """Run :meth:`run_once` in a daemon thread until :meth:`stop`."""
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="sample-uploader", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the thread to stop and wait up to ``timeout`` seconds (an upload in flight finishes first)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        delay = 0.0
        while not self._stop.wait(delay):
            try:
                delay = self.run_once()
            except Exception:  # keep shipping after a bug in one pass; the traceback is logged
                LOGGER.exception("sample upload pass failed")
                delay = self.poll_interval_s

    def _check_paused(self) -> bool:
        paused = bool(self.paused())
        if paused != self.paused_now:
            LOGGER.info("sample uploads %s", "paused" if paused else "resumed")
            self.paused_now = paused
        return paused

    def _failed(self, error: UploadError) -> None:
        if not self.consecutive_failures:
            LOGGER.warning("sample upload failing, retrying with backoff: %s", error)
        self.failed_attempts += 1
        self.consecutive_failures += 1
        self.last_error = str(error)

    def _succeeded(self, records: int) -> None:
        if self.consecutive_failures:
            LOGGER.info("sample uploads recovered after %d failed attempts", self.consecutive_failures)
        self.consecutive_failures = 0
        self.uploaded_files += 1
        self.uploaded_records += records

    def _reject(self, path: Path, error: UploadError) -> None:
        LOGGER.error("receiver refused %s, moved to rejected/: %s", path.name, error)
        self.store.reject(path)
        self.rejected_files += 1
