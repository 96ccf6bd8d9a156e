"""Real hosts on one machine: Linux network namespaces on a bridge (ip netns + veth), made and removed by a test.

Every address lives only inside the namespaces and on this machine's one cable to their switch (10.231.N.0/24,
N picked free); nothing is routed anywhere else. Root only (``ip netns`` needs CAP_NET_ADMIN): elsewhere the tests
that use it skip with the reason, and fail under CI=true.
"""

from __future__ import annotations

import os
import random
import subprocess
from dataclasses import dataclass

from tests.conftest import skip_unless_ci


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str


def _ip(*args: str) -> None:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def _free_subnet() -> int:
    taken = subprocess.run(["ip", "-o", "addr"], capture_output=True, text=True, timeout=30).stdout
    for candidate in random.sample(range(1, 250), 249):
        if f"10.231.{candidate}." not in taken:
            return candidate
    raise RuntimeError("no free 10.231.N.0/24 subnet for the test network")


class Network:
    """``with Network(["control", "worker-a"]) as net: net.hosts["control"].address``."""

    def __init__(self, names: list[str]) -> None:
        if os.geteuid() != 0:
            skip_unless_ci("network namespaces need root (ip netns)")
        self.tag = f"{os.getpid() % 10000}{random.randint(0, 99):02d}"
        self.subnet = _free_subnet()
        self.lan = f"el{self.tag}-lan"  # the switch: a namespace of its own holding the bridge
        self.hosts = {name: Host(name, f"el{self.tag}-{name}", f"10.231.{self.subnet}.{index + 1}")
                      for index, name in enumerate(names)}

    @property
    def bridge_address(self) -> str:
        """This machine's own address on the network (the test process reaches the hosts through it)."""
        return f"10.231.{self.subnet}.254"

    def _plug(self, index: int, namespace: str | None, address: str) -> None:
        """A cable from ``namespace`` (None: this machine's) to the switch, with ``address`` on its end."""
        end, port = f"elv{self.tag}e{index}", f"elv{self.tag}p{index}"
        _ip("link", "add", end, "type", "veth", "peer", "name", port)
        _ip("link", "set", port, "netns", self.lan)
        _ip("-n", self.lan, "link", "set", port, "master", "switch", "up")
        inside = ("-n", namespace) if namespace else ()
        if namespace:
            _ip("link", "set", end, "netns", namespace)
            _ip(*inside, "link", "set", "lo", "up")
        _ip(*inside, "addr", "add", f"{address}/24", "dev", end)
        _ip(*inside, "link", "set", end, "up")

    def __enter__(self) -> Network:
        # The bridge lives in a namespace of its own: on a machine with a Docker engine, bridged frames in this
        # machine's namespace go through its iptables FORWARD chain, which Docker sets to DROP.
        try:
            _ip("netns", "add", self.lan)
            _ip("-n", self.lan, "link", "add", "switch", "type", "bridge")
            _ip("-n", self.lan, "link", "set", "switch", "up")
            self._plug(0, None, self.bridge_address)
            for index, host in enumerate(self.hosts.values(), start=1):
                _ip("netns", "add", host.namespace)
                self._plug(index, host.namespace, host.address)
        except RuntimeError as error:
            self.__exit__()
            skip_unless_ci(f"cannot make network namespaces here: {error}")
        return self

    def set_link(self, name: str, up: bool) -> None:
        """Cut (or restore) one host's only link at the switch, as a pulled cable would."""
        index = list(self.hosts).index(name) + 1
        _ip("-n", self.lan, "link", "set", f"elv{self.tag}p{index}", "up" if up else "down")

    def __exit__(self, *exc: object) -> None:
        for namespace in [*(host.namespace for host in self.hosts.values()), self.lan]:  # their cables go with them
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, timeout=30)
        subprocess.run(["ip", "link", "del", f"elv{self.tag}e0"], capture_output=True, timeout=30)
