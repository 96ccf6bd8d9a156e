"""Container packaging (WIP, issue 9): the build context of an edge image and its offline wheelhouse.

An image is built from ``docker/Dockerfile`` and a context assembled here:

    wheelhouse/        the edge stack's wheels for the target platform, resolved on the host with
                       ``pip download --only-binary=:all: --platform ...`` against requirements.lock,
                       plus ``pip.whl`` and ``requirements.txt`` (the build needs no network)
    edge/              the device package, as it is in the repository
    keys/              the trusted public keys (never a private key)
    store/             a model store with the signed bundle installed and verified on the host

Wheelhouses are cached per (platform, runtime, lock hash) in the cache folder. Still to come (see the
issue): the build through the Docker SDK, labels and tags, the gates, push, and the ``package`` stage.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from edge.signing import load_public_keys
from edge.store import ModelStore
from tasks.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO_ROOT / "requirements.lock"
EDGE_PACKAGE = REPO_ROOT / "edge"
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
# what edge/ imports at run time, besides the runtime itself; versions come from requirements.lock
EDGE_REQUIREMENTS = ("numpy", "fastapi", "uvicorn", "httptools", "uvloop", "prometheus-client", "cryptography",
                     "orjson", "httpx")
RUNTIME_REQUIREMENTS = {"tflite": "ai-edge-litert", "onnx": "onnxruntime"}
PIP_PLATFORMS = {"linux/amd64": "x86_64", "linux/arm64": "aarch64"}
MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")


def wheelhouse(platform: str, runtime: str, cache_dir: Path) -> Path:
    """A folder of wheels for ``runtime``'s edge image on ``platform`` (cached; resolved offline-ready)."""
    if platform not in PIP_PLATFORMS:
        raise ConfigError(f"platform {platform!r} is not supported; use one of {sorted(PIP_PLATFORMS)}")
    if runtime not in RUNTIME_REQUIREMENTS:
        raise ConfigError(f"runtime {runtime!r} is not supported; use one of {sorted(RUNTIME_REQUIREMENTS)}")
    lock_hash = hashlib.sha256(LOCK_FILE.read_bytes()).hexdigest()[:12]
    target = cache_dir / "wheelhouse" / f"{platform.replace('/', '-')}-{runtime}-{lock_hash}"
    if (target / "requirements.txt").is_file():
        return target
    requirements = [*EDGE_REQUIREMENTS, RUNTIME_REQUIREMENTS[runtime]]
    machine = PIP_PLATFORMS[platform]
    platforms = [flag for tag in MANYLINUX for flag in ("--platform", f"{tag}_{machine}")]
    scratch = Path(tempfile.mkdtemp(prefix=".partial-", dir=_ensure(cache_dir / "wheelhouse")))
    try:
        command = [sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms,
                   "--python-version", "3.11", "--implementation", "cp", "--abi", "cp311", "--abi", "abi3",
                   "--abi", "none", "--dest", str(scratch), "--constraint", str(LOCK_FILE), *requirements, "pip"]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode != 0:
            raise ConfigError(f"could not resolve the {runtime} wheels for {platform} (is the package index "
                              f"reachable?):\n{completed.stderr[-1500:]}")
        next(scratch.glob("pip-*.whl")).rename(scratch / "pip.whl")  # the Dockerfile runs pip from its wheel
        (scratch / "requirements.txt").write_text("\n".join(requirements) + "\n")
        scratch.rename(target)  # complete or absent: never half a wheelhouse in the cache
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return target


def _ensure(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def build_context(bundle: Path, public_keys: list[Path], platform: str, runtime: str, cache_dir: Path,
                  destination: Path) -> Path:
    """Assemble the image build context for ``bundle`` in the empty folder ``destination``."""
    keys = load_public_keys(public_keys)
    ModelStore(destination / "store", keys).install(bundle)  # verified and health-checked on the host first
    shutil.copytree(wheelhouse(platform, runtime, cache_dir), destination / "wheelhouse")
    shutil.copytree(EDGE_PACKAGE, destination / "edge", ignore=shutil.ignore_patterns("__pycache__", "openapi.json"))
    (destination / "keys").mkdir()
    for path in public_keys:
        sources = sorted(path.glob("*.pub")) if path.is_dir() else [path]
        for source in sources:
            shutil.copy(source, destination / "keys" / source.name)
    shutil.copy(DOCKERFILE, destination / "Dockerfile")
    (destination / ".dockerignore").write_text("**/__pycache__\n")
    return destination
