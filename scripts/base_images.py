"""``make base-images``: Python 3.11 base images built from Debian packages, for when no registry is reachable.

The Dockerfile's default base is the official ``python:3.11-slim``; where images cannot be pulled
(this project's test machines), ``debootstrap --variant=minbase --include=python3`` builds a bookworm
root file system (Python 3.11, matching the cp311 wheels) that ``docker import`` turns into
``edgeloop/python-base:bookworm-<arch>``. arm64 is bootstrapped in two stages under qemu user
emulation (``qemu-user-static`` + binfmt). Root file systems are cached as tarballs in the cache folder
(``EDGELOOP_CACHE``, default ``~/.cache/edgeloop``); images already in the engine are kept.

    python -m scripts.base_images [--arch amd64 arm64]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from scripts.docker_engine import CACHE_DIR, ensure
from scripts.services import REPO_ROOT, ServiceError

MIRROR = os.environ.get("EDGELOOP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
REPOSITORY = "edgeloop/python-base"
PLATFORMS = {"amd64": "linux/amd64", "arm64": "linux/arm64"}
QEMU = {"arm64": "qemu-aarch64-static"}
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt/archives",
        "var/lib/apt/lists")


def image_tag(arch: str) -> str:
    return f"{REPOSITORY}:{SUITE}-{arch}"


def _run(command: list[str], what: str, **kwargs) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if completed.returncode != 0:
        raise ServiceError(f"{what} failed (exit {completed.returncode}):\n{completed.stderr[-2000:]}")


def _host_arch() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()


def _enable_binfmt(arch: str) -> None:
    """qemu user emulation for ``arch`` binaries (needed to finish a foreign debootstrap and run its images)."""
    emulator = shutil.which(QEMU[arch])
    if emulator is None:
        raise ServiceError(f"{QEMU[arch]} is missing: apt-get install qemu-user-static binfmt-support")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], "mounting binfmt_misc")
    name = QEMU[arch].removesuffix("-static").removeprefix("qemu-")
    if not (binfmt / f"qemu-{name}").exists():
        _run(["update-binfmts", "--enable", f"qemu-{name}"], f"enabling qemu-{name} in binfmt_misc")


def bootstrap_rootfs(arch: str, cache_dir: Path = CACHE_DIR) -> Path:
    """A cached tarball of a minimal bookworm root with python3 for ``arch``."""
    tarball = cache_dir / "rootfs" / f"{SUITE}-python3-{arch}.tar"
    if tarball.is_file():
        return tarball
    if shutil.which("debootstrap") is None:
        raise ServiceError("debootstrap is missing: apt-get install debootstrap")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"edgeloop-rootfs-{arch}-", dir=tarball.parent) as scratch:
        root = Path(scratch) / "root"
        common = ["--variant=minbase", "--include=python3", f"--arch={arch}"]
        if arch == _host_arch():
            _run(["debootstrap", *common, SUITE, str(root), MIRROR], f"debootstrap {arch}")
        else:
            _enable_binfmt(arch)
            _run(["debootstrap", "--foreign", *common, SUITE, str(root), MIRROR], f"debootstrap {arch} (first stage)")
            shutil.copy(shutil.which(QEMU[arch]), root / "usr" / "bin")
            _run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"], f"debootstrap {arch} (second)")
            (root / "usr" / "bin" / QEMU[arch]).unlink()
        for folder in TRIM:
            shutil.rmtree(root / folder, ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], f"packing the {arch} root")
        partial.rename(tarball)  # the cache never holds half a root file system
    return tarball


def ensure_base_image(arch: str, docker_host: str, cache_dir: Path = CACHE_DIR) -> str:
    """``edgeloop/python-base:bookworm-<arch>`` in the engine at ``docker_host``; returns its tag."""
    import docker

    tag = image_tag(arch)
    client = docker.DockerClient(base_url=docker_host)
    try:
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.get(tag)
            return tag
    finally:
        client.close()
    tarball = bootstrap_rootfs(arch, cache_dir)
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise ServiceError("the docker command is missing: apt-get install docker.io")
    _run([docker_cli, "import", "--platform", PLATFORMS[arch], "--change", 'CMD ["python3"]', str(tarball), tag],
         f"docker import of the {arch} root", env={**os.environ, "DOCKER_HOST": docker_host})
    return tag


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", nargs="+", default=list(PLATFORMS), choices=PLATFORMS)
    parser.add_argument("--run-dir", type=Path, default=REPO_ROOT / ".run")
    args = parser.parse_args(argv)
    try:
        host = ensure(args.run_dir)
        for arch in args.arch:
            print(ensure_base_image(arch, host))
    except ServiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
