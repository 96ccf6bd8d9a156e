"""The Docker engine the packaging talks to, through the Engine API (the ``docker`` Python package).

Which engine: ``DOCKER_HOST`` when set, else ``/var/run/docker.sock``, else the engine
``scripts/docker_engine.py`` starts for tests, CI and the demo (its socket is in the cache folder).
This module never starts an engine: a stage that finds none says how to start one.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from tasks.errors import PackagingError, ServiceUnavailable

CACHE_DIR = Path(os.environ.get("EDGELOOP_CACHE", Path.home() / ".cache" / "edgeloop"))
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
CONTAINER_PORT = 8080
NPY_TYPE = "application/x-npy"


def own_engine_host(cache_dir: Path = CACHE_DIR) -> str:
    """The socket of the dockerd that ``scripts/docker_engine.py`` starts."""
    return f"unix://{cache_dir / 'docker' / 'docker.sock'}"


def answers(docker_host: str, timeout_s: float = 3.0) -> bool:
    """True when a Docker engine answers a ping at ``docker_host``."""
    import docker

    try:
        client = docker.DockerClient(base_url=docker_host, timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # docker raises assorted connection errors; all mean "not here"
        return False


def find_engine(cache_dir: Path = CACHE_DIR) -> str | None:
    """The ``DOCKER_HOST`` of the first engine that answers, or None."""
    explicit = os.environ.get("DOCKER_HOST")
    candidates = [explicit] if explicit else [DEFAULT_SOCKET, own_engine_host(cache_dir)]
    return next((host for host in candidates if answers(host)), None)


@dataclass
class Engine:
    host: str     # the DOCKER_HOST it answers at (for the docker CLI, which some steps use)
    client: object  # docker.DockerClient

    def cli_env(self) -> dict[str, str]:
        return {**os.environ, "DOCKER_HOST": self.host}

    def close(self) -> None:
        self.client.close()


def connect(timeout_s: float = 600.0) -> Engine:
    """The engine :func:`find_engine` picks; a clear error when none answers."""
    import docker

    host = find_engine()
    if host is None:
        named = os.environ.get("DOCKER_HOST") or f"{DEFAULT_SOCKET} or {own_engine_host()}"
        raise ServiceUnavailable(f"no Docker engine answers at {named}: start one with `python -m "
                                 "scripts.docker_engine up` (needs Debian's docker.io) or point DOCKER_HOST at one")
    return Engine(host, docker.DockerClient(base_url=host, timeout=timeout_s))


def build(client, context: Path, tag: str, platform: str, base_image: str, labels: dict[str, str]) -> str:
    """Build ``context`` (its Dockerfile) for ``platform`` as ``tag``; the image id. Never pulls."""
    log: list[str] = []
    image_id = None
    for chunk in client.api.build(path=str(context), tag=tag, platform=platform, labels=labels, pull=False,
                                  buildargs={"BASE_IMAGE": base_image}, rm=True, forcerm=True, decode=True):
        if "error" in chunk:
            tail = "".join(log[-15:]).rstrip()
            raise PackagingError(f"building {tag} for {platform} failed: {chunk['error'].strip()}\n{tail}")
        log.append(chunk.get("stream", ""))
        image_id = (chunk.get("aux") or {}).get("ID", image_id)
    if image_id is None:
        tail = "".join(log)[-2000:]
        raise PackagingError(f"building {tag} for {platform} ended without an image; build log:\n{tail}")
    return image_id


def image_mb(client, reference: str) -> float:
    """The image's uncompressed size in MB (10^6 bytes, as ``docker images`` shows it)."""
    return client.images.get(reference).attrs["Size"] / 1e6


@dataclass
class RunningContainer:
    container: object
    url: str
    ready_s: float  # from the run call to the first 200 from /readyz

    def logs(self) -> str:
        return self.container.logs(tail=40).decode(errors="replace")

    def exec(self, *command: str) -> str:
        code, output = self.container.exec_run(list(command))
        if code != 0:
            raise PackagingError(f"{' '.join(command)} failed in the container (exit {code}): {output.decode()}")
        return output.decode().strip()

    def predict(self, inputs: np.ndarray, timeout_s: float = 60.0) -> dict:
        import io

        body = io.BytesIO()
        np.save(body, np.asarray(inputs, np.float32))
        response = httpx.post(f"{self.url}/v1/predict", content=body.getvalue(), timeout=timeout_s,
                              headers={"Content-Type": NPY_TYPE})
        if response.status_code != 200:
            raise PackagingError(f"/v1/predict in the container answered HTTP {response.status_code}: "
                                 f"{response.text[:500]}")
        return response.json()


@contextmanager
def running(client, image: str, platform: str, cpus: float | None, memory_mb: int | None, timeout_s: float,
            environment: dict[str, str] | None = None) -> Iterator[RunningContainer]:
    """Start ``image`` with the given limits on a loopback port; wait until /readyz answers 200; remove it after."""
    limits = {}
    if cpus is not None:
        limits["nano_cpus"] = int(cpus * 1e9)
    if memory_mb is not None:
        limits.update(mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m")  # no swap: the device has none
    started = time.perf_counter()
    container = client.containers.run(image, detach=True, platform=platform, environment=environment or {},
                                      ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", None)}, **limits)
    try:
        container.reload()
        port = container.attrs["NetworkSettings"]["Ports"][f"{CONTAINER_PORT}/tcp"][0]["HostPort"]
        url = f"http://127.0.0.1:{port}"
        ready_s = _wait_ready(container, url, started, timeout_s)
        yield RunningContainer(container, url, ready_s)
    finally:
        container.remove(force=True)


def _wait_ready(container, url: str, started: float, timeout_s: float) -> float:
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return time.perf_counter() - started
        except httpx.HTTPError:
            pass  # not listening yet
        container.reload()
        if container.status not in ("created", "running"):
            logs = container.logs(tail=30).decode(errors="replace")
            raise PackagingError(f"the container exited ({container.status}) before it was ready:\n{logs}")
        if time.perf_counter() - started > timeout_s:
            logs = container.logs(tail=30).decode(errors="replace")
            raise PackagingError(f"the container was not ready within {timeout_s:.0f} s:\n{logs}")
        time.sleep(0.05)


def push(client, repository: str, tag: str) -> str:
    """Push ``repository:tag``; the manifest digest the registry stored."""
    digest = None
    for chunk in client.images.push(repository, tag=tag, stream=True, decode=True):
        if "error" in chunk:
            raise ServiceUnavailable(f"pushing {repository}:{tag} failed: {chunk['error']}")
        digest = (chunk.get("aux") or {}).get("Digest", digest)
    if digest is None:
        raise PackagingError(f"the registry did not report a digest for {repository}:{tag}")
    return digest
