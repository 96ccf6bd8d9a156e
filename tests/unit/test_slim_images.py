"""What the edge images leave out: slimmed wheels (pruned files, stripped shared objects) and the runtime root."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import subprocess
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from tasks.errors import ConfigError
from tasks.packaging.base_images import runtime_kept
from tasks.packaging.slim_wheels import slim_wheel, slim_wheelhouse
from tests.conftest import require_system_tools

# a real extension module of this interpreter, with its symbol table: what a wheel's shared objects look like
EXTENSION = next(Path(sysconfig.get_config_var("DESTSHARED")).glob("_json.cpython-*.so"))


def _wheel(folder: Path, files: dict[str, bytes], name: str = "demo_pkg-1.0-cp311-cp311-linux_x86_64.whl") -> Path:
    path = folder / name
    record = "".join(f"{member},sha256=x,{len(data)}\n" for member, data in files.items())
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr("demo_pkg-1.0.dist-info/RECORD", record)
    return path


def _symbols(data: bytes, scratch: Path) -> str:
    path = scratch / "probe.so"
    path.write_bytes(data)
    return subprocess.run(["readelf", "-S", str(path)], capture_output=True, text=True, check=True).stdout


def test_a_slimmed_wheel_drops_what_the_device_never_loads_and_its_stripped_module_still_imports(tmp_path):
    require_system_tools("strip", "readelf", packages="binutils-multiarch")
    module = EXTENSION.read_bytes()
    vendored = b"\x7fELF vendored by auditwheel, patched by patchelf: never stripped"
    wheel = _wheel(tmp_path, {"demo_pkg/__init__.py": b"", "demo_pkg/tests/test_demo.py": b"assert True",
                              "demo_pkg/__init__.pyi": b"", "demo_pkg/include/demo.h": b"int x;",
                              f"demo_pkg/{EXTENSION.name}": module, "demo_pkg.libs/libvendored.so.1": vendored})
    before, after = slim_wheel(wheel, tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        stripped = archive.read(f"demo_pkg/{EXTENSION.name}")
        record = archive.read("demo_pkg-1.0.dist-info/RECORD").decode().splitlines()
        assert archive.read("demo_pkg.libs/libvendored.so.1") == vendored
    assert names == {"demo_pkg/__init__.py", f"demo_pkg/{EXTENSION.name}", "demo_pkg.libs/libvendored.so.1",
                     "demo_pkg-1.0.dist-info/RECORD"}
    assert len(stripped) < len(module) and after < before
    assert ".symtab" in _symbols(module, tmp_path) and ".symtab" not in _symbols(stripped, tmp_path)
    for line in record[:-1]:  # every file's hash and size as pip would check them
        member, digest, size = line.split(",")
        with zipfile.ZipFile(wheel) as archive:
            data = archive.read(member)
        expected = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        assert digest == f"sha256={expected}" and int(size) == len(data)
    assert record[-1] == "demo_pkg-1.0.dist-info/RECORD,,"
    (tmp_path / "import").mkdir()
    (tmp_path / "import" / EXTENSION.name).write_bytes(stripped)
    spec = importlib.util.spec_from_file_location("_json", tmp_path / "import" / EXTENSION.name)
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    assert loaded.scanstring('"edge"', 1) == ("edge", 6)


def test_a_shared_object_strip_cannot_read_is_named_and_the_wheel_is_left_as_it_was(tmp_path):
    require_system_tools("strip", packages="binutils-multiarch")
    wheel = _wheel(tmp_path, {"demo_pkg/__init__.py": b"", "demo_pkg/_broken.so": b"not an ELF object"})
    original = wheel.read_bytes()
    with pytest.raises(ConfigError, match=r"demo_pkg/_broken.so.*binutils-multiarch"):
        slim_wheelhouse(tmp_path)
    assert wheel.read_bytes() == original and sorted(path.name for path in tmp_path.iterdir()) == [wheel.name]


def test_without_strip_the_wheelhouse_says_which_package_to_install(tmp_path, monkeypatch):
    monkeypatch.setattr("tasks.packaging.slim_wheels.STRIP", "edgeloop-no-such-strip")
    with pytest.raises(ConfigError, match="apt-get install binutils-multiarch"):
        slim_wheelhouse(tmp_path)


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    return member


@pytest.mark.parametrize(("name", "kept"), [
    ("./usr/bin/python3.11", True), ("./usr/lib/python3.11/json/__init__.py", True),
    ("./usr/lib/python3.11/lib-dynload/_ssl.cpython-311-x86_64-linux-gnu.so", True),
    ("./usr/lib/x86_64-linux-gnu/libcrypto.so.3", True), ("./usr/lib/aarch64-linux-gnu/libstdc++.so.6.0.30", True),
    ("./usr/lib/arm-linux-gnueabihf/ld-linux-armhf.so.3", True), ("./etc/ld.so.cache", True),
    ("./usr/bin/bash", False), ("./usr/bin/apt-get", False), ("./usr/bin/dpkg", False),
    ("./usr/lib/x86_64-linux-gnu/libapt-pkg.so.6.0.0", False), ("./usr/sbin/useradd", False),
    ("./usr/lib/python3.11/sqlite3/__init__.py", False), ("./usr/lib/python3.11/venv/__init__.py", False),
    ("./usr/lib/python3.11/lib-dynload/_sqlite3.cpython-311-x86_64-linux-gnu.so", False),
    ("./var/lib/dpkg/status", False),
    # armv7: Debian's numpy and the BLAS/LAPACK it loads, without its tests, headers and build tools
    ("./usr/lib/python3/dist-packages/numpy/core/_multiarray_umath.cpython-311-arm-linux-gnueabihf.so", True),
    ("./usr/lib/arm-linux-gnueabihf/blas/libblas.so.3.11.0", True),
    ("./usr/lib/arm-linux-gnueabihf/lapack/liblapack.so.3.11.0", True),
    ("./usr/lib/arm-linux-gnueabihf/libgfortran.so.5.0.0", True),
    ("./usr/lib/python3/dist-packages/numpy/core/tests/test_numeric.py", False),
    ("./usr/lib/python3/dist-packages/numpy/f2py/__init__.py", False),
    ("./usr/lib/python3/dist-packages/numpy/core/include/numpy/ndarrayobject.h", False),
    ("./usr/lib/python3/dist-packages/pkg_resources/__init__.py", False),
])
def test_the_runtime_root_keeps_the_interpreter_and_its_libraries_and_nothing_that_installs_or_shells(name, kept):
    assert runtime_kept(_member(name)) is kept


def test_the_runtime_root_keeps_every_directory_and_symbolic_link():
    assert runtime_kept(_member("./usr/share/doc", tarfile.DIRTYPE))
    assert runtime_kept(_member("./usr/bin/python3", tarfile.SYMTYPE, "python3.11"))


def test_a_runtime_root_filtered_from_a_tarball_keeps_hard_links_only_with_their_target(tmp_path):
    from tasks.packaging.base_images import filtered

    source = tmp_path / "root.tar"
    with tarfile.open(source, "w") as archive:
        for name in ("./usr/bin/python3.11", "./usr/bin/bash"):
            member = _member(name)
            member.size = 4
            archive.addfile(member, io.BytesIO(b"\x7fELF"))
        archive.addfile(_member("./usr/lib/python3.11/interpreter", tarfile.LNKTYPE, "./usr/bin/python3.11"))
        archive.addfile(_member("./usr/lib/python3.11/shell", tarfile.LNKTYPE, "./usr/bin/bash"))
    filtered(source, tmp_path / "runtime.tar", keep=runtime_kept)
    with tarfile.open(tmp_path / "runtime.tar") as archive:
        assert archive.getnames() == ["./usr/bin/python3.11", "./usr/lib/python3.11/interpreter"]
