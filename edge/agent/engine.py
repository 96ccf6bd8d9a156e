"""The little of the Docker Engine API the device agent needs, spoken over the engine's unix socket with httpx
(a device cannot import the control plane's ``docker`` package, nor needs it).

Images are pulled by digest only (``registry/repository@sha256:<64 hex>``): what the signed rollout manifest
names is exactly what runs. Containers are started with the service port published on a free loopback port
the agent picks and the engine keeps across restarts (the agent's front forwards to it; a port the engine
picked could change when the container restarts), the device's store and samples mounted, read-only root, the
device profile's memory and CPU limits (no swap), and restarted by the engine when they die (``unless-stopped``:
a service killed for memory comes back without the agent, and after a reboot).
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass, field
from urllib.parse import quote

import httpx

from edge.errors import EdgeError
from edge.rollout import DIGEST_REFERENCE

SERVICE_PORT = "8080/tcp"
LABEL = "io.edgeloop.agent"


class EngineError(EdgeError):
    """The engine refused or failed an operation; the message says which and why."""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass(frozen=True)
class ContainerSpec:
    """How the service container of an image is run."""

    image: str                                   # registry/repository@sha256:...
    name: str
    env: dict[str, str] = field(default_factory=dict)
    binds: list[str] = field(default_factory=list)  # "host/path:/container/path[:ro]"
    user: str | None = None                      # "uid:gid" (default: the image's)
    memory_mb: int | None = None
    cpus: float | None = None
    command: list[str] | None = None             # default: the image's


@dataclass(frozen=True)
class Running:
    """A started container and the loopback port its service is published on."""

    id: str
    name: str
    image: str
    port: int


class Engine:
    """``unix:///var/run/docker.sock`` (or another ``unix://`` engine host)."""

    def __init__(self, host: str = "unix:///var/run/docker.sock", timeout_s: float = 120.0) -> None:
        if not host.startswith("unix://"):
            raise EngineError(f"engine host {host!r}: the agent talks to a local engine over its unix socket "
                              "(unix:///path/docker.sock)")
        self.host = host
        self._client = httpx.Client(transport=httpx.HTTPTransport(uds=host.removeprefix("unix://")),
                                    base_url="http://engine", timeout=timeout_s)

    def close(self) -> None:
        self._client.close()

    def _call(self, method: str, path: str, what: str, **kwargs) -> httpx.Response:
        try:
            response = self._client.request(method, path, **kwargs)
        except httpx.HTTPError as error:
            raise EngineError(f"{what}: the Docker engine at {self.host} does not answer ({error})") from error
        if response.status_code >= 400:
            try:
                message = response.json().get("message", response.text)
            except ValueError:
                message = response.text
            raise EngineError(f"{what}: the engine answered {response.status_code}: {message[:500]}")
        return response

    def pull(self, reference: str) -> str:
        """Pull ``reference`` (by digest only) and return the image id."""
        if not DIGEST_REFERENCE.fullmatch(reference):
            raise EngineError(f"image {reference!r} is not pinned by digest (registry/repository@sha256:...)")
        what = f"pulling {reference}"
        with self._client.stream("POST", "/images/create", params={"fromImage": reference}) as response:
            if response.status_code >= 400:
                response.read()
                raise EngineError(f"{what}: the engine answered {response.status_code}: {response.text[:500]}")
            for line in response.iter_lines():
                if line.strip() and "error" in (event := json.loads(line)):
                    raise EngineError(f"{what}: {event['error']}")
        return self._call("GET", f"/images/{quote(reference, safe='')}/json", what).json()["Id"]

    def run(self, spec: ContainerSpec) -> Running:
        """Create and start ``spec``'s container; its id and the loopback port of its service."""
        host_config: dict = {"Binds": spec.binds, "ReadonlyRootfs": True, "Tmpfs": {"/tmp": ""},
                             "PortBindings": {SERVICE_PORT: [{"HostIp": "127.0.0.1", "HostPort": str(_free_port())}]},
                             "RestartPolicy": {"Name": "unless-stopped"}}
        if spec.memory_mb:
            host_config |= {"Memory": spec.memory_mb * 2**20, "MemorySwap": spec.memory_mb * 2**20}
        if spec.cpus:
            host_config["NanoCpus"] = int(spec.cpus * 1e9)
        body = {"Image": spec.image, "Env": [f"{key}={value}" for key, value in spec.env.items()],
                "ExposedPorts": {SERVICE_PORT: {}}, "Labels": {LABEL: "service"}, "HostConfig": host_config}
        if spec.user:
            body["User"] = spec.user
        if spec.command:
            body["Cmd"] = spec.command
        created = self._call("POST", "/containers/create", f"creating {spec.name}", params={"name": spec.name},
                             json=body).json()["Id"]
        try:
            self._call("POST", f"/containers/{created}/start", f"starting {spec.name}")
            bound = self.inspect(created)["NetworkSettings"]["Ports"][SERVICE_PORT]
            return Running(created, spec.name, spec.image, int(bound[0]["HostPort"]))
        except (EngineError, KeyError, TypeError, IndexError, ValueError) as error:
            self.remove(created)
            raise EngineError(f"starting {spec.name} from {spec.image}: {error}") from None

    def inspect(self, container: str) -> dict:
        return self._call("GET", f"/containers/{container}/json", f"inspecting {container}").json()

    def named(self, pattern: str) -> list[str]:
        """The ids of every container (running or not) whose whole name matches the regular expression."""
        found = self._call("GET", "/containers/json", f"listing containers named {pattern}",
                           params={"all": "1", "filters": json.dumps({"name": [f"^/{pattern}$"]})}).json()
        return [entry["Id"] for entry in found]

    def status(self, container: str) -> tuple[bool, int]:
        """(whether ``container`` runs now, how many times the engine restarted it after it died), from one
        inspection; (False, 0) for one that is gone. One that waits to be restarted does not run."""
        try:
            info = self.inspect(container)
        except EngineError:
            return False, 0
        state = info["State"]
        return bool(state["Running"]) and not state.get("Restarting"), int(info.get("RestartCount") or 0)

    def running(self, container: str) -> bool:
        """Whether ``container`` exists and runs (False for one that exited, is gone, or waits to be restarted)."""
        return self.status(container)[0]

    def logs(self, container: str, lines: int = 20) -> str:
        """The container's last ``lines`` of output (for a failure report)."""
        try:
            raw = self._call("GET", f"/containers/{container}/logs", f"reading {container}'s logs",
                             params={"stdout": 1, "stderr": 1, "tail": lines}).content
        except EngineError as error:
            return str(error)
        text, index = [], 0
        while index + 8 <= len(raw):  # the multiplexed stream: 8-byte frame headers
            size = int.from_bytes(raw[index + 4:index + 8], "big")
            text.append(raw[index + 8:index + 8 + size].decode(errors="replace"))
            index += 8 + size
        return "".join(text) if text else raw.decode(errors="replace")

    def stop(self, container: str, grace_s: int = 10) -> None:
        """SIGTERM, then SIGKILL after ``grace_s``: the service finishes what it serves and closes idle connections."""
        try:
            self._call("POST", f"/containers/{container}/stop", f"stopping {container}", params={"t": grace_s},
                       timeout=grace_s + 30)
        except EngineError as error:
            if "404" not in str(error) and "304" not in str(error):
                raise

    def remove(self, container: str) -> None:
        """Stop and remove ``container`` (gone already: nothing to do)."""
        try:
            self._call("DELETE", f"/containers/{container}", f"removing {container}", params={"force": "true"})
        except EngineError as error:
            if "404" not in str(error):
                raise
