"""The Docker engine the packaging talks to, through the Engine API (the ``docker`` Python package).

Which engine: ``DOCKER_HOST`` when set, else ``/var/run/docker.sock``, else the engine
``tasks/stack/dockerd.py`` starts for tests, CI and the demo (its socket is in the cache folder).
This module never starts an engine: a stage that finds none says how to start one.
"""

from __future__ import annotations

import base64
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import requests

from tasks.errors import PackagingError, ServiceUnavailable
from tasks.packaging.platforms import image_platform

CACHE_DIR = Path(os.environ.get("EDGELOOP_CACHE", Path.home() / ".cache" / "edgeloop"))
DEFAULT_SOCKET = "unix:///var/run/docker.sock"
CONTAINER_PORT = 8080
NPY_TYPE = "application/x-npy"


@contextmanager
def cache_lock(name: str, cache_dir: Path = CACHE_DIR) -> Iterator[None]:
    """Hold ``<cache>/<name>.lock`` exclusively: one process fills a cache entry, the others wait and reuse it."""
    import fcntl

    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / f"{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def own_engine_host(cache_dir: Path = CACHE_DIR) -> str:
    """The socket of the dockerd that ``tasks/stack/dockerd.py`` starts."""
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
        raise ServiceUnavailable(f"no Docker engine answers at {named}: `make repro` (for dvc repro) and `make image` "
                                 "start one with the image registry (as root, Debian's docker.io), or point "
                                 "DOCKER_HOST at one")
    return Engine(host, docker.DockerClient(base_url=host, timeout=timeout_s))


def build(client, context: Path, tag: str, platform: str, base_image: str, labels: dict[str, str],
          runtime_base: str | None = None) -> str:
    """Build ``context`` (its Dockerfile) with BuildKit for ``platform`` as ``tag``, on ``base_image`` (the
    ``BASE_IMAGE`` build argument) and ``runtime_base`` (``RUNTIME_BASE``, when the Dockerfile has a final stage on
    another base); the image id.

    BuildKit, through the Engine API's ``/build?version=2`` (the docker package drives only the classic
    builder, which records foreign-platform multi-stage images as the host's architecture). BuildKit
    resolves a foreign-platform base image from its registry, so base images are registry references.
    """
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w", format=tarfile.GNU_FORMAT) as archive:  # BuildKit misreads PAX
        archive.add(context, arcname=".")
    api = client.api
    arguments = {"BASE_IMAGE": base_image, **({"RUNTIME_BASE": runtime_base} if runtime_base else {})}
    query = {"t": tag, "version": "2", "platform": platform, "rm": "1", "forcerm": "1",
             "labels": json.dumps(labels), "buildargs": json.dumps(arguments)}
    # One BuildKit build at a time per cache: Debian's dockerd (20.10) can crash under concurrent BuildKit builds
    # (moby/moby#40752, moby/buildkit#2889), and on a small host they only compete for the same cores anyway.
    with cache_lock("buildkit-build"):
        try:
            response = api.post(f"{api.base_url}/v{api.api_version}/build", params=query, data=body.getvalue(),
                                headers={"Content-Type": "application/x-tar"}, stream=True, timeout=None)
            if response.status_code != 200:
                raise PackagingError(f"the engine refused to build {tag}: HTTP {response.status_code} "
                                     f"{response.text[:500]}")
            log = BuildLog()
            image_id = _read_build_stream(response.iter_lines(), tag, platform, log)
        except requests.RequestException as error:
            raise PackagingError(f"the Docker engine at {api.base_url} dropped the build of {tag} for {platform} "
                                 f"({type(error).__name__}: {error}): did dockerd exit? Its log says why "
                                 "(ours: the run folder's dockerd.log); `edgeloop engine up` starts it again") from None
    if image_id is None:
        raise PackagingError(f"building {tag} for {platform} ended without an image:\n{log.tail()}")
    return image_id


def _read_build_stream(lines: Iterator[bytes], tag: str, platform: str, log: BuildLog) -> str | None:
    """The image id a BuildKit build stream ends with (None if it names none); its errors as PackagingError."""
    image_id = None
    for line in lines:
        chunk = json.loads(line)
        if chunk.get("id") == "moby.buildkit.trace":
            log.add(base64.b64decode(chunk["aux"]))
        elif "error" in chunk or "errorDetail" in chunk:
            message = chunk.get("error") or chunk["errorDetail"].get("message", "")
            raise PackagingError(f"building {tag} for {platform} failed: {message.strip()}\n{log.tail()}")
        elif chunk.get("id") == "moby.image.id":
            image_id = chunk["aux"]["ID"]
    return image_id


class BuildLog:
    """The readable part of BuildKit's progress stream (``StatusResponse`` protobuf messages): step names,
    step errors and the steps' output, read with a minimal protobuf wire-format reader."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, message: bytes) -> None:
        for field, value in _protobuf_fields(message):
            if field == 1 and isinstance(value, bytes):  # Vertex: 3 name, 7 error
                for inner, text in _protobuf_fields(value):
                    if inner == 7 and isinstance(text, bytes) and text:
                        self.lines.append(f"error: {text.decode(errors='replace')}")
            elif field == 3 and isinstance(value, bytes):  # VertexLog: 4 msg
                for inner, text in _protobuf_fields(value):
                    if inner == 4 and isinstance(text, bytes):
                        self.lines += text.decode(errors="replace").splitlines()

    def tail(self, count: int = 25) -> str:
        return "\n".join(self.lines[-count:])


def _protobuf_fields(data: bytes) -> list[tuple[int, int | bytes]]:
    """(field number, value) pairs of one protobuf message: varints as int, length-delimited as bytes."""
    fields, position = [], 0

    def varint() -> int:
        nonlocal position
        result = shift = 0
        while True:
            byte = data[position]
            position += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    try:
        while position < len(data):
            key = varint()
            field, wire = key >> 3, key & 7
            if wire == 0:
                fields.append((field, varint()))
            elif wire == 2:
                length = varint()
                fields.append((field, data[position:position + length]))
                position += length
            elif wire in (1, 5):
                position += 8 if wire == 1 else 4
            else:
                break  # groups are not used by BuildKit's status messages
    except IndexError:
        pass  # a truncated message: keep what was read
    return fields


def image_mb(client, reference: str) -> float:
    """The image's uncompressed size in MB (10^6 bytes, as ``docker images`` shows it)."""
    return client.images.get(reference).attrs["Size"] / 1e6


IMAGE_PYTHON = "/opt/edgeloop/bin/python"  # the edge image's interpreter (it has no shell: exec runs this)


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
        body = io.BytesIO()
        np.save(body, np.asarray(inputs, np.float32))
        response = httpx.post(f"{self.url}/v1/predict", content=body.getvalue(), timeout=timeout_s,
                              headers={"Content-Type": NPY_TYPE})
        if response.status_code != 200:
            raise PackagingError(f"/v1/predict in the container answered HTTP {response.status_code}: "
                                 f"{response.text[:500]}")
        return response.json()


def emulated_cpuinfo(cores: int, platform: str = "linux/arm64") -> str:
    """``platform``'s ``/proc/cpuinfo`` (its emulated core, :mod:`tasks.packaging.platforms`) for containers under
    qemu user emulation.

    qemu-user shows the host's x86 ``/proc/cpuinfo``, on which the CPU detection of LiteRT and ONNX
    Runtime crashes; and qemu's default CPU model offers extensions (dot product, SVE, ...) whose
    emulation gave XNNPACK's int8 kernels wrong results. Emulated containers therefore run with
    ``QEMU_CPU`` set to a real core of the device class (Cortex-A72 for arm64, Cortex-A7 for armv7) and see
    this matching description.
    """
    core = image_platform(platform).cpuinfo_core
    return "".join(f"processor\t: {index}\n{core}" for index in range(max(cores, 1)))


@contextmanager
def device_options(cpus: float | None, memory_mb: int | None, emulated: bool,
                   environment: dict[str, str] | None = None, platform: str = "linux/arm64") -> Iterator[dict]:
    """``containers.run``/``create`` options for a device profile: its CPUs and memory (no swap, no core dumps),
    and under emulation ``platform``'s CPU and ``/proc/cpuinfo`` (:func:`emulated_cpuinfo`; the file lives
    until the context ends)."""
    import docker

    options: dict = {"ulimits": [docker.types.Ulimit(name="core", soft=0, hard=0)],  # a crash never dumps core
                     "environment": dict(environment or {})}
    if cpus is not None:
        options["nano_cpus"] = int(cpus * 1e9)
    if memory_mb is not None:
        options.update(mem_limit=f"{memory_mb}m", memswap_limit=f"{memory_mb}m")  # no swap: the device has none
    with tempfile.TemporaryDirectory(prefix="edgeloop-cpuinfo-") as scratch:
        if emulated:
            cpuinfo = Path(scratch) / "cpuinfo"
            cpuinfo.write_text(emulated_cpuinfo(int(cpus or 1), platform))
            options["volumes"] = {str(cpuinfo): {"bind": "/proc/cpuinfo", "mode": "ro"}}
            options["environment"] = {"QEMU_CPU": image_platform(platform).emulated_cpu, **options["environment"]}
        yield options


@contextmanager
def running(client, image: str, platform: str, cpus: float | None, memory_mb: int | None, timeout_s: float,
            environment: dict[str, str] | None = None, emulated: bool = False) -> Iterator[RunningContainer]:
    """Start ``image`` with the given limits on a loopback port; wait until /readyz answers 200; remove it after."""
    with device_options(cpus, memory_mb, emulated, environment, platform) as options:
        with _started(client, image, platform, timeout_s, options) as container:
            yield container


@contextmanager
def _started(client, image: str, platform: str, timeout_s: float, options: dict) -> Iterator[RunningContainer]:
    started = time.perf_counter()
    container = client.containers.run(image, detach=True, platform=platform,
                                      ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", None)}, **options)
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
