"""What an edge image is built from: the build context (:func:`build_context`) and the base image.

Build context::

    wheelhouse/   the edge stack's wheels for the target platform, resolved on the host with
                  ``pip download --only-binary=:all: --platform ...`` against requirements.lock,
                  plus ``pip.whl``, ``requirements.txt`` (every wheel, pinned: the image installs exactly these,
                  ``--no-deps``) and ``pip-platforms`` (the target's ``--platform`` flags: the builder runs on
                  the host's platform); the build needs no network; slimmed (:mod:`tasks.packaging.slim_wheels`).
                  Where Debian brings what has no wheel (numpy on armv7, :mod:`tasks.packaging.platforms`), the
                  runtime's wheel comes without its dependencies and ``debian-dist-packages.pth`` puts
                  Debian's ``dist-packages`` on the image's path
    edge/         the device package, as it is in the repository
    keys/         the trusted public keys (never a private key)
    store/        a model store with the signed bundle installed and verified on the host
    Dockerfile    docker/Dockerfile

Wheelhouses are cached per (platform, runtimes, lock, requirements, slimming recipe) in the cache folder
(``EDGELOOP_CACHE``).
The base images (:func:`resolve_base_image`) are the configured one, else the official slim Python,
else the Debian-built base (the builder stage) and runtime (the final stage; :mod:`tasks.packaging.base_images`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import requests

from edge.signing import load_public_keys
from edge.store.manifest import Manifest
from edge.store.model_store import ModelStore
from tasks.errors import ConfigError
from tasks.packaging import docker_client as docker_engine
from tasks.packaging.base_images import RECIPE_LABEL, ensure_base_image
from tasks.packaging.docker_client import Engine, cache_lock
from tasks.packaging.oci_registry import Registry
from tasks.packaging.platforms import RUNTIME_REQUIREMENTS, PlatformUnavailable, by_arch, host_arch, image_platform
from tasks.packaging.slim_wheels import RECIPE as SLIM_RECIPE
from tasks.packaging.slim_wheels import slim_wheelhouse

log = logging.getLogger(__name__)

OFFICIAL_BASE = "python:3.11-slim"
PULL_TIMEOUT_S = 60
REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_ROOT / "requirements.lock"
EDGE_PACKAGE = REPO_ROOT / "edge"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
# what edge/ imports at run time, besides the runtime itself; versions come from requirements.lock
# (no cryptography: a device verifies signatures with the OpenSSL Python's ssl module loads, edge/signing.py;
# no pydantic: edge/schema.py checks the device's records, rollout manifests included)
EDGE_REQUIREMENTS = ("numpy", "starlette", "uvicorn", "httptools", "uvloop", "prometheus-client",
                     "orjson", "httpx", "paho-mqtt")  # httpx, paho-mqtt: the updater (python -m edge.updater)
DEBIAN_PATH_FILE = "debian-dist-packages.pth"
WHEELHOUSE_LAYOUT = 2  # 2: requirements.txt pins every wheel (installed --no-deps); a cached older one is not reused


def wheelhouse(platform: str, runtimes: list[str], cache_dir: Path) -> Path:
    """A folder of wheels for an edge image with ``runtimes`` on ``platform`` (cached; resolved offline-ready);
    :class:`PlatformUnavailable` naming the package a platform lacks."""
    target_platform = image_platform(platform)
    unknown = sorted(set(runtimes) - set(RUNTIME_REQUIREMENTS))
    if unknown:
        raise ConfigError(f"runtime {unknown} is not supported; use one of {sorted(RUNTIME_REQUIREMENTS)}")
    edge = [name for name in EDGE_REQUIREMENTS if name not in target_platform.no_wheel]
    runtime_wheels = [target_platform.runtime_requirement(runtime) for runtime in sorted(runtimes)]
    requirements = [*edge, *runtime_wheels]
    layout = (requirements, SLIM_RECIPE, WHEELHOUSE_LAYOUT)
    recipe = hashlib.sha256(LOCK_FILE.read_bytes() + repr(layout).encode()).hexdigest()[:12]
    target = cache_dir / "wheelhouse" / f"{platform.replace('/', '-')}-{'-'.join(sorted(runtimes))}-{recipe}"
    with cache_lock(f"wheelhouse-{target.name}", cache_dir):  # one process downloads, the others reuse
        if not (target / "requirements.txt").is_file():
            # a runtime whose dependencies Debian brings (armv7's numpy) comes without them
            download_wheels(platform, edge if target_platform.no_wheel else requirements, target,
                            f"the {'+'.join(runtimes)} wheels for {platform}",
                            runtime_wheels if target_platform.no_wheel else [])
    return target


def download_wheels(platform: str, requirements: list[str], target: Path, what: str,
                    without_dependencies: list[str] | None = None) -> None:
    """Wheels of ``requirements`` (pinned by requirements.lock), of ``without_dependencies`` alone and pip's own for
    ``platform`` into the new folder ``target``, with the ``requirements.txt`` an image build installs from (every
    wheel, pinned); complete or absent. A missing wheel raises :class:`PlatformUnavailable` naming it."""
    target_platform = image_platform(platform)
    platforms = [flag for tag in target_platform.manylinux
                 for flag in ("--platform", f"{tag}_{target_platform.pip_machine}")]
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        common = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms,
                  "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
                  "--abi", "none", "--dest", str(scratch), "--constraint", str(LOCK_FILE)]
        _pip_download([*common, *requirements, "pip"], platform, what)
        if without_dependencies:
            _pip_download([*common, "--no-deps", *without_dependencies], platform, what)
        next(scratch.glob("pip-*.whl")).rename(scratch / "pip.whl")  # the Dockerfile runs pip from its wheel
        before, after = slim_wheelhouse(scratch)
        log.info("%s: %.1f MB of wheel content slimmed to %.1f MB", what, before / 2**20, after / 2**20)
        pinned = sorted("==".join(wheel.name.split("-")[:2]) for wheel in scratch.glob("*-*.whl"))
        (scratch / "requirements.txt").write_text("\n".join(pinned) + "\n")
        # the builder stage runs on the host's platform and installs these wheels for the target's
        (scratch / "pip-platforms").write_text(" ".join(platforms) + "\n")
        if target_platform.debian_python:
            (scratch / DEBIAN_PATH_FILE).write_text("/usr/lib/python3/dist-packages\n")
        scratch.rename(target)  # complete or absent: never half a wheelhouse in the cache
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def _pip_download(command: list[str], platform: str, what: str) -> None:
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode == 0:
        return
    missing = re.search(r"No matching distribution found for ([^\s]+)", completed.stderr)
    if missing:
        raise PlatformUnavailable(platform, missing.group(1), "no CPython 3.11 wheel of it for "
                                  f"{image_platform(platform).pip_machine} was found (is the package index "
                                  f"reachable?):\n{completed.stderr[-800:]}")
    raise ConfigError(f"could not resolve {what} (is the package index reachable?):\n{completed.stderr[-1500:]}")


def runtimes_of(manifest: Manifest) -> list[str]:
    """The runtimes ``manifest``'s models need (a cascade may mix LiteRT and ONNX Runtime)."""
    return sorted({entry.runtime for entry in manifest.models})


def build_context(bundle: Path, public_keys: list[Path], platform: str, cache_dir: Path,
                  destination: Path) -> Manifest:
    """Assemble the image build context for ``bundle`` in the empty folder ``destination``; its manifest."""
    keys = load_public_keys(public_keys)
    manifest = ModelStore(destination / "store", keys).install(bundle)  # verified and health-checked first
    shutil.copytree(wheelhouse(platform, runtimes_of(manifest), cache_dir), destination / "wheelhouse")
    shutil.copytree(EDGE_PACKAGE, destination / "edge", ignore=shutil.ignore_patterns("__pycache__"))
    (destination / "keys").mkdir()
    for path in public_keys:
        sources = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        for source in sources:
            shutil.copy(source, destination / "keys" / source.name)
    shutil.copy(DOCKERFILE, destination / "Dockerfile")
    (destination / ".dockerignore").write_text("**/__pycache__\n")
    return manifest


def recipe_sha256(context: Path, base: str) -> str:
    """sha256 over what decides an image besides the model, the same for every platform of one build:
    Dockerfile, edge code, the pinned requirements and the base image's recipe."""
    digest = hashlib.sha256(f"{base}\n".encode())
    for path in sorted((context / "edge").rglob("*")):
        if path.is_file():
            digest.update(f"{path.relative_to(context)}\n".encode() + hashlib.sha256(path.read_bytes()).digest())
    digest.update((context / "wheelhouse" / "requirements.txt").read_bytes())
    digest.update(LOCK_FILE.read_bytes())
    digest.update((context / "Dockerfile").read_bytes())
    return digest.hexdigest()


def base_recipe(engine: Engine, base: str) -> str:
    """What the base image is, independent of its platform: its recipe label, else its repo digest, else its id."""
    import docker

    try:
        image = engine.client.images.get(base)
    except docker.errors.ImageNotFound:
        return base  # pulled by BuildKit at build time: its reference is all that is known here
    return image.labels.get(RECIPE_LABEL) or next(iter(image.attrs.get("RepoDigests") or []), image.id)


def resolve_base_image(engine: Engine, configured: str | None, arch: str, registry: Registry) -> tuple[str, str]:
    """The (builder, runtime) base image references for an ``arch`` image: the configured one (both), else the
    official slim Python when the engine has or can pull it (both), else the Debian-built base of the host's
    architecture (the builder runs there, whatever the target) and ``arch``'s runtime image (pushed to
    ``registry``, where BuildKit finds them)."""
    import docker

    platform = by_arch(arch).docker
    for reference in [configured] if configured else [OFFICIAL_BASE]:
        with contextlib.suppress(docker.errors.ImageNotFound):
            if engine.client.images.get(reference).attrs.get("Architecture") == platform.split("/")[1]:
                return reference, reference
        puller = docker.DockerClient(base_url=engine.host, timeout=PULL_TIMEOUT_S)  # a silent network fails fast
        try:
            puller.images.pull(reference, platform=platform)
            return reference, reference
        except requests.exceptions.RequestException as error:
            if configured:
                raise ConfigError(f"pulling package.base_image {configured!r} timed out ({error})") from error
            log.info("%s cannot be pulled (%s): using the Debian-built base", reference, error)
        except docker.errors.APIError as error:
            if configured:
                raise ConfigError(f"package.base_image {configured!r} for {platform} is neither in the engine nor "
                                  f"pullable ({error.explanation}); set package.base_image: null to build one "
                                  "from Debian packages") from error
            log.info("%s cannot be pulled (%s): using the Debian-built base", reference, error.explanation)
        finally:
            puller.close()
    return (_in_registry(engine, registry, ensure_base_image(host_arch(), engine)),
            _in_registry(engine, registry, ensure_base_image(arch, engine, runtime=True)))


def _in_registry(engine: Engine, registry: Registry, local: str) -> str:
    """``local`` pushed to ``registry`` unless the registry holds the same recipe; its registry reference."""
    repository, tag = local.rsplit(":", 1)
    held = registry.labels(repository, tag) if registry.digest(repository, tag) else {}
    if held.get(RECIPE_LABEL) != engine.client.images.get(local).labels.get(RECIPE_LABEL):
        engine.client.images.get(local).tag(f"{registry.address}/{repository}", tag)
        docker_engine.push(engine.client, f"{registry.address}/{repository}", tag)
    return f"{registry.address}/{local}"
