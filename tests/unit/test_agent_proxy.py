"""The agent's switchable TCP front (edge/agent/proxy.py) over real sockets on loopback: new connections follow a
switch, open ones stay with their container until they close, a taken port and a missing upstream are named."""

from __future__ import annotations

import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from edge.agent.proxy import ProxyError, SwitchableProxy
from tasks.stack.services import free_port


@contextmanager
def upstream(name: str) -> Iterator[int]:
    """A container stand-in: answers every line with ``<name>:<line>`` until the client closes."""

    class Answer(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            for line in self.rfile:
                self.wfile.write(f"{name}:".encode() + line)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Answer)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def ask(connection: socket.socket, text: str) -> str:
    connection.sendall(text.encode() + b"\n")
    return connection.makefile("rb").readline().decode().strip()


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_new_connections_follow_a_switch_and_open_ones_drain_on_their_container() -> None:
    with upstream("old") as old, upstream("new") as new:
        proxy = SwitchableProxy("127.0.0.1", free_port(), old)
        proxy.start()
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as before:
                assert ask(before, "a") == "old:a"
                assert proxy.switch(new) == old
                with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as after:
                    assert ask(after, "b") == "new:b"
                assert ask(before, "c") == "old:c"  # in flight across the switch: not cut
                assert proxy.connections_to(old) == 1
            wait_for(lambda: proxy.connections_to(old) == 0)  # drained: the old container may go
        finally:
            proxy.stop()


def test_a_taken_port_is_named_and_a_missing_upstream_closes_the_connection() -> None:
    with upstream("old") as old:
        with pytest.raises(ProxyError, match="is the port taken"):
            SwitchableProxy("127.0.0.1", old, old).start()
        proxy = SwitchableProxy("127.0.0.1", free_port(), free_port(), connect_timeout_s=1.0)  # nothing there
        proxy.start()
        try:
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as connection:
                connection.sendall(b"x\n")
                assert connection.recv(16) == b""
        finally:
            proxy.stop()
