"""Runners: one interface, chosen per device by ``devices.yaml`` (``runner.kind``).

Each takes a folder made by :func:`tasks.benchmark.staging.stage_inputs` and returns the
``edge.bench`` document measured on the device. A runner that cannot reach the device, times out or
finds the device unable to run the benchmark raises :class:`RunnerError` with what to do;
:func:`run_with_retries` tries again (``benchmark.retries``) and the stage turns a final failure into
error rows for that device, going on with the others.

- ``local``: a subprocess on this host, confined to the runner's cpus/memory_mb (:mod:`.confine`).
- ``docker``: the packaged edge image on a Docker engine (local or ``DOCKER_HOST=ssh://...``), with the
  device's ``--cpus``/``--memory``/``--platform``; a foreign architecture runs under qemu and is marked
  emulated. Files go in and out through the Engine API (``put_archive``), so remote engines work too.
- ``ssh``: the folder plus the ``edge`` package copied to a temporary directory over SFTP (host key
  checked against known_hosts, key authentication), run with the device's Python, result fetched, the
  directory removed.
- ``prefect``: :mod:`.prefect_runner`.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shlex
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Protocol

from tasks.benchmark.confine import confined
from tasks.benchmark.staging import JOB_FILE, RESULT_FILE
from tasks.config import BenchmarkParams, PackageParams
from tasks.devices import DeviceSpec
from tasks.packaging.platforms import BY_ARCH, host_arch, image_platform

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]
EDGE_PACKAGE = REPO_ROOT / "edge"
HOST_ARCH = host_arch()
CONTAINER_DIR = "/tmp/edgeloop-bench"


class RunnerError(Exception):
    """The device could not be benchmarked (unreachable, timed out, no image, no Python...)."""

    def __init__(self, message: str, transient: bool = True) -> None:
        super().__init__(message)
        self.transient = transient  # worth another try (network, timeout) or not (configuration)


class Runner(Protocol):
    kind: str

    def run(self, device: DeviceSpec, inputs: Path, timeout_s: float) -> dict[str, Any]: ...


def container_cpus(device: str, cpus: float | None, host_cpus: int | None = None) -> float | None:
    """The device's CPU quota for its container, at most this host's CPUs (the engine refuses more: a 4-core
    board's profile on a 2-core host); a capped quota is logged, and its figures are the host's, not the device's."""
    host_cpus = host_cpus or os.cpu_count() or 1
    if cpus is None or cpus <= host_cpus:
        return cpus
    log.warning("%s: runner.cpus %g is more than this host's %d CPUs: its container gets %d", device, cpus,
                host_cpus, host_cpus)
    return float(host_cpus)


def _bench_command(python: str, out: str = RESULT_FILE) -> list[str]:
    return [python, "-m", "edge.bench", "--job", JOB_FILE, "--out", out]


def _read_document(text: str, where: str) -> dict[str, Any]:
    try:
        document = json.loads(text)
    except ValueError as error:
        raise RunnerError(f"the result from {where} is not JSON ({error})", transient=False) from None
    if not isinstance(document, dict) or document.get("schema") != "edgeloop.bench/1":
        raise RunnerError(f"the result from {where} is not an edgeloop.bench/1 document", transient=False)
    return document


def _failed(where: str, returncode: int, output: str) -> RunnerError:
    tail = "\n".join(output.strip().splitlines()[-8:])
    return RunnerError(f"edge.bench on {where} exited with code {returncode}: {tail}", transient=False)


# ---- local ------------------------------------------------------------------------------------------

class LocalRunner:
    kind = "local"

    def run(self, device: DeviceSpec, inputs: Path, timeout_s: float) -> dict[str, Any]:
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}
        with confined(device.runner.cpus, device.runner.memory_mb) as confinement:
            command = confinement.wrap(_bench_command(sys.executable))
            try:
                completed = subprocess.run(command, cwd=inputs, env=env, capture_output=True, text=True,
                                           timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise RunnerError(f"timed out after {timeout_s:.0f} s on this host") from None
        result = inputs / RESULT_FILE
        if completed.returncode != 0 or not result.is_file():
            raise _failed("this host", completed.returncode, completed.stderr or completed.stdout)
        document = _read_document(result.read_text(), "this host")
        document["runner"] = {"kind": self.kind, "confinement": confinement.describe()}
        return document


# ---- docker -----------------------------------------------------------------------------------------

def _tar_folder(folder: Path, arcname: str, uid: int = 10001) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        def owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = uid  # the image's non-root user writes the result here
            info.uname = info.gname = ""
            return info
        archive.add(folder, arcname=arcname, filter=owned)
    return buffer.getvalue()


def _untar_file(chunks, name: str) -> bytes:
    archive = tarfile.open(fileobj=io.BytesIO(b"".join(chunks)))
    member = archive.extractfile(name)
    if member is None:
        raise RunnerError(f"{name} is not a file in the container", transient=False)
    return member.read()


def newest_image(registry_address: str, repository: str, platform: str, runtime: str | None = None) -> str | None:
    """The newest packaged edge image for ``platform`` in the registry (by its ``created`` label), one carrying
    ``runtime`` when there is one (images carry one runtime each: a class's variant decides which), or None."""
    from tasks.packaging.oci_registry import Registry

    registry = Registry(registry_address)
    newest: tuple[bool, str, str] | None = None
    arch = image_platform(platform).arch
    for tag in registry.tags(repository):
        if not tag.endswith(f"-{arch}"):  # image tags end with the architecture: skip the others' labels
            continue
        labels = registry.labels(repository, tag)
        if labels.get("edgeloop.platform") != platform:
            continue
        key = (labels.get("edgeloop.runtime") == runtime, labels.get("org.opencontainers.image.created", ""), tag)
        if newest is None or key > newest:
            newest = key
    return f"{registry_address}/{repository}:{newest[2]}" if newest else None


class DockerRunner:
    kind = "docker"

    def __init__(self, params: BenchmarkParams, package: PackageParams) -> None:
        self.params, self.package = params, package

    def image_for(self, platform: str, runtime: str | None = None) -> str:
        """``benchmark.images``' image for ``platform``, else the newest packaged one, of ``runtime`` if any."""
        if platform in self.params.images:
            return self.params.images[platform]
        registry = self.package.registry  # EDGELOOP_REGISTRY is applied when the config loads
        try:
            image = newest_image(registry, self.package.repository, platform, runtime)
        except Exception as error:  # the registry is down or answers nonsense
            raise RunnerError(f"cannot list edge images in {registry} ({error})") from error
        if image is None:
            raise RunnerError(f"no edge image for {platform} in {registry}/{self.package.repository}: package one "
                              f"(edgeloop package --platform {platform}) or set benchmark.images", transient=False)
        return image

    def run(self, device: DeviceSpec, inputs: Path, timeout_s: float) -> dict[str, Any]:
        import docker
        from tasks.packaging import docker_client as docker_engine
        platform = device.runner.platform or BY_ARCH[HOST_ARCH].docker
        image = self.image_for(platform, device.preferred_runtime)
        emulated = image_platform(platform).arch != HOST_ARCH
        try:
            engine = docker_engine.connect(timeout_s=120)
        except Exception as error:
            raise RunnerError(str(error)) from error
        environment = {"EDGELOOP_EMULATED": "1" if emulated else "0"}
        try:
            with docker_engine.device_options(container_cpus(device.name, device.runner.cpus),
                                              device.runner.memory_mb, emulated, environment, platform) as options:
                return self._run_container(engine.client, image, platform, inputs, timeout_s, options, emulated)
        except docker.errors.ImageNotFound as error:
            raise RunnerError(f"image {image} not found ({error.explanation})", transient=False) from error
        except docker.errors.APIError as error:
            raise RunnerError(f"the Docker engine refused: {error.explanation}") from error
        finally:
            engine.close()

    def _run_container(self, client, image: str, platform: str, inputs: Path, timeout_s: float,
                       options: dict[str, Any], emulated: bool) -> dict[str, Any]:
        import requests

        from tasks.packaging.docker_client import IMAGE_PYTHON

        container = client.containers.create(
            image, entrypoint=[IMAGE_PYTHON], command=_bench_command(IMAGE_PYTHON)[1:],
            working_dir=CONTAINER_DIR,
            platform=platform, network_disabled=True, **options)
        try:
            container.put_archive("/tmp", _tar_folder(inputs, Path(CONTAINER_DIR).name))
            started = time.perf_counter()
            container.start()
            try:
                status = container.wait(timeout=timeout_s)
            except requests.exceptions.RequestException:  # the wait's read timed out
                raise RunnerError(f"timed out after {timeout_s:.0f} s in {image}") from None
            code = status.get("StatusCode", -1)
            if code != 0:
                logs = container.logs(tail=20).decode(errors="replace")
                if "No module named edge.bench" in logs:
                    raise RunnerError(f"{image} predates the on-device benchmark (it has no edge.bench): package "
                                      "the model again (edgeloop package) or set benchmark.images", transient=False)
                hint = " (killed: out of memory?)" if code == 137 else ""
                raise RunnerError(f"edge.bench in {image} exited with code {code}{hint}: {logs[-1500:]}",
                                  transient=False)
            chunks, _ = container.get_archive(f"{CONTAINER_DIR}/{RESULT_FILE}")
            document = _read_document(_untar_file(chunks, RESULT_FILE).decode(), image)
        finally:
            container.remove(force=True)
        document["environment"]["emulated"] = emulated
        document["runner"] = {"kind": self.kind, "image": image, "platform": platform,
                              "wall_s": time.perf_counter() - started}
        return document


# ---- ssh --------------------------------------------------------------------------------------------

class SshRunner:
    kind = "ssh"

    def __init__(self, params: BenchmarkParams) -> None:
        self.params = params

    def run(self, device: DeviceSpec, inputs: Path, timeout_s: float) -> dict[str, Any]:
        try:
            return asyncio.run(asyncio.wait_for(self._run(device, inputs), timeout_s))
        except TimeoutError:
            raise RunnerError(f"timed out after {timeout_s:.0f} s on {self._target(device)}") from None

    def _target(self, device: DeviceSpec) -> str:
        runner = device.runner
        return f"{runner.user + '@' if runner.user else ''}{runner.host}:{runner.port or 22}"

    def _connect_options(self, device: DeviceSpec) -> dict[str, Any]:
        options: dict[str, Any] = {"port": device.runner.port or 22, "connect_timeout": 20}
        if device.runner.user:
            options["username"] = device.runner.user
        if self.params.ssh_key:
            options["client_keys"] = [str(self.params.ssh_key)]
        known_hosts = self.params.known_hosts or Path.home() / ".ssh" / "known_hosts"
        if not Path(known_hosts).is_file():
            raise RunnerError(f"known_hosts file {known_hosts} not found: add the device's host key "
                              f"(ssh-keyscan -p {options['port']} {device.runner.host} >> {known_hosts}) "
                              "or set benchmark.known_hosts; host keys are always verified", transient=False)
        options["known_hosts"] = str(known_hosts)
        return options

    async def _run(self, device: DeviceSpec, inputs: Path) -> dict[str, Any]:
        import asyncssh

        target = self._target(device)
        try:
            connection = await asyncssh.connect(device.runner.host, **self._connect_options(device))
        except (asyncssh.HostKeyNotVerifiable, asyncssh.PermissionDenied) as error:
            raise RunnerError(f"{target} refused: {type(error).__name__}: {error} (check benchmark.known_hosts "
                              "and benchmark.ssh_key)", transient=False) from error
        except (OSError, asyncssh.Error) as error:
            raise RunnerError(f"cannot connect to {target}: {type(error).__name__}: {error}") from error
        async with connection:
            made = await connection.run("mktemp -d /tmp/edgeloop-bench.XXXXXX", check=False)
            if made.exit_status != 0:
                raise RunnerError(f"cannot make a temporary directory on {target}: {made.stderr}", transient=False)
            remote = str(made.stdout).strip()
            try:
                async with connection.start_sftp_client() as sftp:
                    await sftp.put([str(p) for p in inputs.iterdir()], remote, recurse=True)
                    await sftp.put(str(EDGE_PACKAGE), remote, recurse=True)
                command = (f"cd {shlex.quote(remote)} && PYTHONPATH=. PYTHONDONTWRITEBYTECODE=1 "
                           f"{shlex.join(_bench_command(device.runner.python))}")
                completed = await connection.run(command, check=False)
                if completed.exit_status != 0:
                    if completed.exit_status == 127:
                        raise RunnerError(f"{device.runner.python} not found on {target}: set runner.python",
                                          transient=False)
                    raise _failed(target, completed.exit_status or -1, str(completed.stderr or completed.stdout))
                async with connection.start_sftp_client() as sftp:
                    async with sftp.open(f"{remote}/{RESULT_FILE}") as handle:
                        text = await handle.read()
            finally:
                await connection.run(f"rm -rf {shlex.quote(remote)}", check=False)
        document = _read_document(text, target)
        document["runner"] = {"kind": self.kind, "target": target, "python": device.runner.python}
        return document
