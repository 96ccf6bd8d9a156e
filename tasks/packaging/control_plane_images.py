"""The compose control plane's images (docker/compose.control-plane.yml), built here with no image hub.

- :data:`PYTHON_IMAGE`: Prefect (server, worker) and MLflow (tracking server) with the PostgreSQL drivers, on the
  Debian-built Python base (:mod:`tasks.packaging.base_images`), from a wheelhouse resolved on the host against
  requirements.lock (``docker/control-plane.Dockerfile``).
- :data:`DEBIAN_IMAGES`: PostgreSQL 15, Redis, Mosquitto, the registry and Prometheus from Debian's packages: one
  debootstrap root holding the five (cached in the cache folder like the base images, imported once), and one
  small target per service giving it its official image's entry point and paths
  (``docker/control-plane-debian.Dockerfile``).

Where a hub is reachable the official images stay selectable: the compose file reads ``EDGELOOP_*_IMAGE``.
An image already in the engine is kept while its recipe label (inputs' hash) matches.

    edgeloop base-images --control-plane
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

from tasks.packaging.base_images import (
    SUITE,
    bootstrap_rootfs,
    docker_command,
    ensure_base_image,
    filtered,
    recipe_current,
)
from tasks.packaging.docker_client import CACHE_DIR, Engine, cache_lock
from tasks.packaging.image_build import LOCK_FILE, REPO_ROOT, download_wheels

DOCKER_DIR = REPO_ROOT / "docker"
# versions from requirements.lock; Debian's Python is 3.11.2, where redis (Prefect's) also needs async-timeout
# (the lock, made on a newer 3.11, does not hold it: pinned here)
PYTHON_REQUIREMENTS = ["prefect", "prefect-redis", "mlflow", "psycopg2-binary", "asyncpg", "async-timeout==5.0.1"]
PYTHON_IMAGE = "edgeloop/control-plane:prefect-3.9.1-mlflow-3.17.2"
DEBIAN_PACKAGES = ("postgresql-15", "redis-server", "mosquitto", "docker-registry", "prometheus")
ROOT_IMAGE = f"edgeloop/control-plane-root:{SUITE}-amd64"
DEBIAN_IMAGES = {"postgres": f"edgeloop/postgres:15-{SUITE}", "redis": f"edgeloop/redis:7-{SUITE}",
                 "mosquitto": f"edgeloop/mosquitto:2-{SUITE}",
                 "registry": f"edgeloop/registry:2-{SUITE}", "prometheus": f"edgeloop/prometheus:2-{SUITE}"}
# what the services never use (their root is ~870 MB otherwise): the time zones of every moment.js build
# (Prometheus' classic UI; its API and the new UI work), promtool, and PostgreSQL's JIT (LLVM; run with jit=off)
DEBIAN_EXCLUDED = ("usr/share/javascript/moment-timezone", "usr/bin/promtool", "usr/lib/*/libLLVM-14.so.1",
                   "usr/lib/*/libz3.so.4", "usr/lib/postgresql/15/lib/llvmjit.so", "usr/lib/postgresql/15/lib/bitcode",
                   "usr/share/doc", "usr/share/man", "usr/share/locale")
RECIPE_LABEL = "edgeloop.control-plane-recipe"


def _recipe(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def python_image(engine: Engine, cache_dir: Path = CACHE_DIR) -> str:
    """:data:`PYTHON_IMAGE` in ``engine``, built when missing or stale; its tag."""
    dockerfile = DOCKER_DIR / "control-plane.Dockerfile"
    recipe = _recipe(dockerfile.read_bytes(), LOCK_FILE.read_bytes(), " ".join(PYTHON_REQUIREMENTS).encode())
    with cache_lock("control-plane-python", cache_dir):
        if recipe_current(engine, PYTHON_IMAGE, RECIPE_LABEL, recipe):
            return PYTHON_IMAGE
        base = ensure_base_image("amd64", engine, cache_dir)
        wheels = cache_dir / "wheelhouse" / f"control-plane-{recipe}"
        if not (wheels / "requirements.txt").is_file():
            download_wheels("linux/amd64", PYTHON_REQUIREMENTS, wheels, "the control plane's wheels (Prefect, MLflow)")
        with tempfile.TemporaryDirectory(prefix="edgeloop-control-plane-") as scratch:
            context = Path(scratch)
            shutil.copytree(wheels, context / "wheelhouse")
            shutil.copy(dockerfile, context / "Dockerfile")
            docker_command(engine, "build", "--quiet", "--build-arg", f"BASE_IMAGE={base}", "--label",
                           f"{RECIPE_LABEL}={recipe}", "-t", PYTHON_IMAGE, str(context),
                           what=f"building {PYTHON_IMAGE}")
    return PYTHON_IMAGE


def debian_images(engine: Engine, cache_dir: Path = CACHE_DIR) -> dict[str, str]:
    """:data:`DEBIAN_IMAGES` in ``engine``, built when missing or stale; service -> tag."""
    dockerfile = DOCKER_DIR / "control-plane-debian.Dockerfile"
    entrypoint = DOCKER_DIR / "postgres-entrypoint.sh"
    root_recipe = _recipe(repr((SUITE, DEBIAN_PACKAGES, DEBIAN_EXCLUDED)).encode())
    recipe = _recipe(root_recipe.encode(), dockerfile.read_bytes(), entrypoint.read_bytes())
    with cache_lock("control-plane-debian", cache_dir):
        if all(recipe_current(engine, tag, RECIPE_LABEL, recipe) for tag in DEBIAN_IMAGES.values()):
            return dict(DEBIAN_IMAGES)
        if not recipe_current(engine, ROOT_IMAGE, RECIPE_LABEL, root_recipe):
            tarball = bootstrap_rootfs("amd64", cache_dir, DEBIAN_PACKAGES, name=f"control-plane-{root_recipe}")
            with tempfile.TemporaryDirectory(prefix="edgeloop-import-", dir=tarball.parent) as scratch:
                slim = Path(scratch) / "root.tar"
                filtered(tarball, slim, DEBIAN_EXCLUDED)
                docker_command(engine, "import", "--change", f"LABEL {RECIPE_LABEL}={root_recipe}", str(slim),
                               ROOT_IMAGE, what=f"docker import of {ROOT_IMAGE}")
        with tempfile.TemporaryDirectory(prefix="edgeloop-control-plane-") as scratch:
            context = Path(scratch)
            shutil.copy(dockerfile, context / "Dockerfile")
            shutil.copy(entrypoint, context / "postgres-entrypoint.sh")
            for service, tag in DEBIAN_IMAGES.items():
                docker_command(engine, "build", "--quiet", "--target", service, "--build-arg",
                               f"BASE_IMAGE={ROOT_IMAGE}", "--label", f"{RECIPE_LABEL}={recipe}", "-t", tag,
                               str(context), what=f"building {tag}")
    return dict(DEBIAN_IMAGES)


def ensure_control_plane_images(engine: Engine, cache_dir: Path = CACHE_DIR) -> dict[str, str]:
    """Every image the compose control plane runs, hub-free; the ``EDGELOOP_*_IMAGE`` settings that pick them."""
    python = python_image(engine, cache_dir)
    debian = debian_images(engine, cache_dir)
    return {"EDGELOOP_PREFECT_IMAGE": python, "EDGELOOP_MLFLOW_IMAGE": python,
            **{f"EDGELOOP_{service.upper()}_IMAGE": tag for service, tag in debian.items()}}
