"""A TCP front on the device's service port that forwards to whichever container serves now.

An image update starts the new container beside the old one on a port of its own; once the new one is
ready and healthy, :meth:`SwitchableProxy.switch` points new connections at it. Connections already open
keep their old upstream until they close, so no request in flight is cut; :meth:`connections_to` tells
when the old container has drained and may be removed. Until a switch, every connection goes to the old
container: an update that fails never touches the traffic.

The proxy runs its own asyncio loop in a daemon thread; :meth:`start` returns once it listens.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import Counter

from edge.errors import EdgeError

CHUNK_BYTES = 64 * 1024


class ProxyError(EdgeError):
    """The front could not listen (port taken, address not here) or was used before it started."""


class SwitchableProxy:
    """``host:port`` forwarded to ``upstream_host:<upstream port>``; the upstream port can change at any time."""

    def __init__(self, host: str, port: int, upstream_port: int, upstream_host: str = "127.0.0.1",
                 connect_timeout_s: float = 5.0) -> None:
        self.host, self.port, self.upstream_host = host, port, upstream_host
        self.connect_timeout_s = connect_timeout_s
        self._upstream_port = upstream_port
        self._open: Counter[int] = Counter()  # upstream port -> connections open to it
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def upstream_port(self) -> int:
        with self._lock:
            return self._upstream_port

    def switch(self, upstream_port: int) -> int:
        """Send new connections to ``upstream_port``; returns the port they went to before."""
        with self._lock:
            previous, self._upstream_port = self._upstream_port, upstream_port
        return previous

    def connections_to(self, upstream_port: int) -> int:
        """Connections still open to ``upstream_port`` (0: it has drained)."""
        with self._lock:
            return self._open[upstream_port]

    def start(self, timeout_s: float = 10.0) -> None:
        started, failure = threading.Event(), []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._serve, self.host, self.port))
            except OSError as error:
                failure.append(error)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="agent-proxy", daemon=True)
        self._thread.start()
        if not started.wait(timeout_s) or failure:
            raise ProxyError(f"cannot listen on {self.host}:{self.port} for the service "
                             f"({failure[0] if failure else 'timed out'}); is the port taken?")

    def stop(self, timeout_s: float = 10.0) -> None:
        loop, server = self._loop, self._server
        if loop is None or server is None:
            return

        async def close() -> None:
            server.close()
            await server.wait_closed()
            connections = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in connections:  # open connections end with the front, not when the loop is gone
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)
            loop.stop()

        asyncio.run_coroutine_threadsafe(close(), loop)
        if self._thread is not None:
            self._thread.join(timeout_s)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        port = self.upstream_port  # chosen once: this connection stays with it
        with self._lock:
            self._open[port] += 1
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.wait_for(
                    asyncio.open_connection(self.upstream_host, port), self.connect_timeout_s)
            except (OSError, TimeoutError):
                return  # the client sees the connection close, as with no service at all
            try:
                await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
            finally:
                with contextlib.suppress(OSError):
                    upstream_writer.close()
        finally:
            with self._lock:
                self._open[port] -= 1
            with contextlib.suppress(OSError):
                writer.close()


async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    """Copy until the source ends, then end the target's writing side (half-close, as TCP clients expect)."""
    try:
        while chunk := await source.read(CHUNK_BYTES):
            target.write(chunk)
            await target.drain()
        if target.can_write_eof():
            target.write_eof()
    except (OSError, RuntimeError):
        return  # either side went away: the other copy ends on its own
