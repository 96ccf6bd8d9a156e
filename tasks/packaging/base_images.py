"""Python 3.11 base images built from Debian packages, for when no image registry is reachable.

The Dockerfile's default base is the official ``python:3.11-slim``; where images cannot be pulled
(this project's test machines), ``debootstrap --variant=minbase --include=python3`` builds a bookworm
root file system (Python 3.11, matching the cp311 wheels) that ``docker import`` turns into
``edgeloop/python-base:bookworm-<arch>`` on the host's architecture. Another architecture's root is
downloaded by debootstrap and unpacked on the host, with nothing emulated (:func:`_unpack_foreign`): it only
ever becomes a runtime image. Root file systems are cached as tarballs in the cache folder
(``EDGELOOP_CACHE``, default ``~/.cache/edgeloop``); an image already in the engine is kept while its
recipe label matches.

What the edge service never uses is left out at import (:data:`EXCLUDED`): documentation, locales,
time zones, glibc's iconv modules (Python has its own codecs), Perl (only dpkg's maintainer scripts
need it: nothing installs Debian packages into these images) and Python's test, IDLE, Tk, 2to3,
ensurepip and pydoc data. That base builds (an image's builder stage, the control-plane images).

The edge image's final stage runs on ``edgeloop/python-runtime:bookworm-<arch>``, imported from the same root
with only what a Python service runs on (:data:`RUNTIME_FILES`, an allow-list): the interpreter, its standard
library and the shared objects it and the edge wheels load. No shell, no package manager, no coreutils: the
final stage copies what the builder prepared and runs nothing (about 40 MB instead of 93 MB).

    make base-images        # edgeloop base-images [--arch amd64 arm64]
"""

from __future__ import annotations

import fnmatch
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from tasks.errors import ConfigError, ServiceUnavailable
from tasks.packaging.docker_client import CACHE_DIR, Engine, cache_lock
from tasks.packaging.platforms import BY_ARCH, PlatformUnavailable, by_arch, host_arch

MIRROR = os.environ.get("EDGELOOP_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "bookworm"
REPOSITORY = "edgeloop/python-base"
PLATFORMS = {arch: platform.docker for arch, platform in BY_ARCH.items()}
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt/archives",
        "var/lib/apt/lists")


# left out of the image (paths inside the root, without the leading "./"; "*" is the multiarch triplet)
EXCLUDED = ("usr/share/zoneinfo", "usr/lib/*/gconv", "usr/lib/*/perl-base", "usr/bin/perl", "usr/bin/perl5.36.0",
            "usr/share/perl5", *(f"usr/lib/python3.11/{name}" for name in
                                 ("test", "idlelib", "tkinter", "lib2to3", "ensurepip", "pydoc_data")))
RECIPE = hashlib.sha256(repr((SUITE, TRIM, EXCLUDED)).encode()).hexdigest()[:16]
RECIPE_LABEL = "edgeloop.base-recipe"

RUNTIME_REPOSITORY = "edgeloop/python-runtime"
# the shared objects the interpreter, the standard library modules kept and the edge wheels need (readelf -d)
RUNTIME_LIBRARIES = ("ld-linux*", "libc.so*", "libm.so*", "libmvec.so*", "libpthread.so*", "libdl.so*", "librt.so*",
                     "libutil.so*", "libresolv.so*", "libnss_files.so*", "libnss_dns.so*", "libz.so*", "libexpat.so*",
                     "libffi.so*", "libssl.so*", "libcrypto.so*", "libbz2.so*", "liblzma.so*", "libuuid.so*",
                     "libstdc++.so*", "libgcc_s.so*",
                     # Debian's numpy (armv7: no wheel), its BLAS and LAPACK (reached through their alternatives)
                     "libblas.so*", "liblapack.so*", "libgfortran.so*")
# regular files the runtime root keeps (fnmatch over the whole path; directories and symbolic links all stay)
RUNTIME_FILES = ("usr/bin/python3.11", "usr/lib/python3.11/*", *(f"usr/lib/*/{name}" for name in RUNTIME_LIBRARIES),
                 "usr/lib/python3/dist-packages/numpy/*",
                 "usr/lib64/ld-linux*", "etc/ld.so.*", "etc/ld.so.conf.d/*", "etc/nsswitch.conf", "etc/host.conf",
                 "etc/ssl/openssl.cnf", "etc/os-release", "usr/lib/os-release", "etc/passwd", "etc/group")
# ... but not the standard library's parts whose shared objects are not kept, or that only build and test
RUNTIME_PYTHON_EXCLUDED = tuple(f"usr/lib/python3.11/{name}" for name in (
    "test/*", "idlelib/*", "tkinter/*", "lib2to3/*", "ensurepip/*", "pydoc_data/*", "turtledemo/*", "sqlite3/*",
    "curses/*", "dbm/*", "distutils/*", "venv/*", "unittest/*", "lib-dynload/_sqlite3.*", "lib-dynload/_curses*",
    "lib-dynload/_dbm.*", "lib-dynload/_gdbm.*", "lib-dynload/readline.*", "lib-dynload/nis.*", "lib-dynload/_crypt.*",
    "lib-dynload/_ctypes_test.*", "lib-dynload/_test*", "lib-dynload/xxlimited*", "lib-dynload/_xxtestfuzz*",
    "__pycache__/*.opt-*", "*/__pycache__/*.opt-*")) + tuple(
    f"usr/lib/python3/dist-packages/numpy/{name}" for name in (
        "*/tests/*", "f2py/*", "distutils/*", "core/include/*", "random/lib/*", "*.pyi", "*/__pycache__/*.opt-*"))
RUNTIME_RECIPE = hashlib.sha256(repr((SUITE, TRIM, RUNTIME_FILES, RUNTIME_PYTHON_EXCLUDED)).encode()).hexdigest()[:16]


def image_tag(arch: str, runtime: bool = False) -> str:
    return f"{RUNTIME_REPOSITORY if runtime else REPOSITORY}:{SUITE}-{arch}"


def _run(command: list[str], what: str, **kwargs) -> None:
    completed = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if completed.returncode != 0:
        raise ServiceUnavailable(f"{what} failed (exit {completed.returncode}):\n{completed.stderr[-2000:]}")


def docker_command(engine: Engine, *args: str, what: str) -> None:
    """The docker CLI with ``args`` against ``engine`` (classic builder: local base images, one platform)."""
    docker_cli = shutil.which("docker")
    if docker_cli is None:
        raise ServiceUnavailable("the docker command is missing: apt-get install docker.io")
    _run([docker_cli, *args], what, env={**engine.cli_env(), "DOCKER_BUILDKIT": "0"})


def recipe_current(engine: Engine, tag: str, label: str, value: str) -> bool:
    """Whether image ``tag`` is in ``engine`` with ``label`` set to ``value`` (its recipe still current)."""
    import docker

    try:
        return engine.client.images.get(tag).labels.get(label) == value
    except docker.errors.ImageNotFound:
        return False


def enable_emulation(arch: str) -> None:
    """qemu user emulation for ``arch`` binaries (to run its images)."""
    qemu = by_arch(arch).qemu or f"qemu for {arch}"
    if shutil.which(qemu) is None:
        raise ServiceUnavailable(f"{qemu} is missing: apt-get install qemu-user-static binfmt-support")
    binfmt = Path("/proc/sys/fs/binfmt_misc")
    if not (binfmt / "status").exists():
        _run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(binfmt)], "mounting binfmt_misc")
    name = qemu.removesuffix("-static").removeprefix("qemu-")
    if not (binfmt / f"qemu-{name}").exists():
        _run(["update-binfmts", "--enable", f"qemu-{name}"], f"enabling qemu-{name} in binfmt_misc")


def bootstrap_rootfs(arch: str, cache_dir: Path = CACHE_DIR, packages: tuple[str, ...] = ("python3",),
                     name: str = "python3") -> Path:
    """A cached tarball of a minimal bookworm root with ``packages`` for ``arch`` (one process builds it);
    ``name`` tells the tarballs apart."""
    tarball = cache_dir / "rootfs" / f"{SUITE}-{name}-{arch}.tar"
    with cache_lock(f"rootfs-{arch}" if name == "python3" else f"rootfs-{name}-{arch}", cache_dir):
        if not tarball.is_file():
            _bootstrap(arch, tarball, packages)
    return tarball


def _bootstrap(arch: str, tarball: Path, packages: tuple[str, ...] = ("python3",)) -> None:
    if shutil.which("debootstrap") is None:
        raise ServiceUnavailable("debootstrap is missing: apt-get install debootstrap")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"edgeloop-rootfs-{arch}-", dir=tarball.parent) as scratch:
        root = Path(scratch) / "root"
        debian = BY_ARCH[arch].debian_arch if arch in BY_ARCH else arch
        common = ["--variant=minbase", f"--include={','.join(packages)}", f"--arch={debian}"]
        if arch == host_arch():
            _debootstrap([*common, SUITE, str(root), MIRROR], arch, debian)
        else:  # unpacked on the host, nothing run: the root of a runtime image (see _unpack_foreign)
            _debootstrap(["--foreign", *common, SUITE, str(root), MIRROR], arch, debian)
            _unpack_foreign(root, arch)
        for folder in TRIM:
            shutil.rmtree(root / folder, ignore_errors=True)
        partial = tarball.with_suffix(".partial")
        _run(["tar", "-C", str(root), "--numeric-owner", "-cf", str(partial), "."], f"packing the {arch} root")
        partial.rename(tarball)  # the cache never holds half a root file system


def _debootstrap(arguments: list[str], arch: str, debian: str) -> None:
    """debootstrap with ``arguments``; a package the archive lacks for ``arch`` is named
    (:class:`PlatformUnavailable`)."""
    completed = subprocess.run(["debootstrap", *arguments], capture_output=True, text=True)
    if completed.returncode == 0:
        return
    missing = re.search(r"Couldn't find these debs: (.+)", completed.stdout + completed.stderr)
    if missing:
        platform = BY_ARCH[arch].docker if arch in BY_ARCH else arch
        raise PlatformUnavailable(platform, missing.group(1).strip(), f"Debian {SUITE} has no such package for "
                                  f"{debian} at {MIRROR}")
    raise ServiceUnavailable(f"debootstrap {arch} failed (exit {completed.returncode}; is {MIRROR} reachable?):\n"
                             f"{(completed.stdout + completed.stderr)[-2000:]}")


def _unpack_foreign(root: Path, arch: str) -> None:
    """Every package debootstrap's first stage downloaded into ``root``, unpacked by the host's ``dpkg-deb`` (usr
    merged as debootstrap laid it out), and the standard library byte-compiled by the host's Python 3.11 (the
    bytecode is the same on every architecture). No maintainer script runs, so nothing is emulated: such a root
    has no configured packages (no users, no package database), which a runtime image never needs (its final
    stage copies its users from the builder, which runs on the host's platform). Minutes of qemu saved per arch.
    """
    for deb in sorted((root / "var" / "cache" / "apt" / "archives").glob("*.deb")):
        unpack = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
        extracted = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)], stdin=unpack.stdout,
                                   capture_output=True, text=True)
        if unpack.wait() != 0 or extracted.returncode != 0:
            raise ServiceUnavailable(f"unpacking {deb.name} for {arch} failed: {extracted.stderr[-500:]}")
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    _link_alternatives(root)
    python = [path for path in (root / "usr/lib/python3.11", root / "usr/lib/python3/dist-packages") if path.is_dir()]
    if sys.version_info[:2] == (3, 11):
        _run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/", *map(str, python)],
             f"byte-compiling the {arch} standard library")


# update-alternatives links the maintainer scripts of an unpacked-only root never made: BLAS and LAPACK
ALTERNATIVES = ("blas/libblas.so.3", "lapack/liblapack.so.3")


def _link_alternatives(root: Path) -> None:
    """``usr/lib/<triplet>/libblas.so.3 -> blas/libblas.so.3`` (and LAPACK's), as their postinst would."""
    for library_dir in (root / "usr" / "lib").glob("*-linux-*"):
        for target in ALTERNATIVES:
            link = library_dir / Path(target).name
            if (library_dir / target).is_file() and not link.exists():
                link.symlink_to(target)


def _excluded(name: str, patterns: tuple[str, ...] = EXCLUDED) -> bool:
    parts = name.removeprefix("./").split("/")
    for pattern in patterns:
        wanted = pattern.split("/")
        if len(parts) >= len(wanted) and all(w in ("*", p) for w, p in zip(wanted, parts)):
            return True
    return False


def runtime_kept(member: tarfile.TarInfo) -> bool:
    """Whether the runtime root keeps ``member`` (:data:`RUNTIME_FILES` less :data:`RUNTIME_PYTHON_EXCLUDED`)."""
    if member.isdir() or member.issym():
        return True
    name = member.name.removeprefix("./")
    return (any(fnmatch.fnmatchcase(name, pattern) for pattern in RUNTIME_FILES)
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in RUNTIME_PYTHON_EXCLUDED))


def filtered(tarball: Path, out: Path, patterns: tuple[str, ...] = EXCLUDED,
             keep: Callable[[tarfile.TarInfo], bool] | None = None) -> None:
    """Copy ``tarball`` to ``out`` without the paths ``patterns`` match (:data:`EXCLUDED`), and only what ``keep``
    keeps when given (a hard link only with its target)."""
    kept: set[str] = set()
    with tarfile.open(tarball) as source, tarfile.open(out, "w") as target:
        for member in source:
            if _excluded(member.name, patterns) or (keep is not None and not keep(member)):
                continue
            if member.islnk() and member.linkname not in kept:
                continue
            kept.add(member.name)
            target.addfile(member, source.extractfile(member) if member.isfile() else None)


def ensure_base_image(arch: str, engine: Engine, cache_dir: Path = CACHE_DIR, runtime: bool = False) -> str:
    """``edgeloop/python-base:bookworm-<arch>`` (or with ``runtime`` ``edgeloop/python-runtime``) in ``engine``,
    built when missing; returns its tag."""
    if not runtime and arch != host_arch():
        raise ConfigError(f"the {arch} Python base is not built here: images build on the host's platform "
                          f"({host_arch()}) and run on a {arch} runtime image (ensure_base_image(..., runtime=True))")
    tag, recipe = image_tag(arch, runtime), RUNTIME_RECIPE if runtime else RECIPE
    with cache_lock(f"{'runtime' if runtime else 'base'}-image-{arch}", cache_dir):  # concurrent packagers: once
        if not recipe_current(engine, tag, RECIPE_LABEL, recipe):
            _import(arch, engine, cache_dir, runtime)
    return tag


def _import(arch: str, engine: Engine, cache_dir: Path, runtime: bool = False) -> None:
    packages = by_arch(arch).debian_packages
    tarball = bootstrap_rootfs(arch, cache_dir, packages, "-".join(packages))
    with tempfile.TemporaryDirectory(prefix="edgeloop-import-", dir=tarball.parent) as scratch:
        slim = Path(scratch) / "root.tar"
        filtered(tarball, slim, keep=runtime_kept if runtime else None)
        docker_command(engine, "import", "--platform", PLATFORMS[arch], "--change",
                       'CMD ["python3.11"]' if runtime else 'CMD ["python3"]', "--change",
                       f"LABEL {RECIPE_LABEL}={RUNTIME_RECIPE if runtime else RECIPE}", str(slim),
                       image_tag(arch, runtime), what=f"docker import of the {arch} {image_tag(arch, runtime)} root")
