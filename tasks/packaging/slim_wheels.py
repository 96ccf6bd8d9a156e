"""Edge wheels slimmed for the device image: what the edge service never loads left out, shared objects stripped.

Run on the host over a downloaded wheelhouse (:func:`slim_wheelhouse`), so every image of every architecture is
built from the same slim wheels and the build itself stays offline and tool-free:

- :data:`PRUNED` files are left out of each wheel: test suites, type stubs, C headers and Cython sources
  everywhere; numpy's Fortran wrapper generator, build helpers and SIMD test module; LiteRT's model compiler,
  vendor compiler plugins, CompiledModel library and WebGPU accelerator (the service runs the classic
  interpreter on the CPU: :mod:`edge.runtime`); ONNX Runtime's C API library (its Python binding has the runtime
  linked in) and its model-conversion tools.
- every shared object of a package is stripped of its symbol and debug sections (``strip --strip-unneeded``; Debian's
  ``binutils-multiarch`` strips amd64, arm64 and armv7 objects alike). uvloop's 13.6 MB loop module is 1.6 MB
  stripped.

The wheel's ``RECORD`` is rewritten for what is left, so pip installs it as any other wheel. An image's gates
(labels agree with the host on the bundle's sample, cold start, size) check that nothing the service needs went.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import shutil
import subprocess
import tempfile
import zipfile
from pathlib import Path

from tasks.errors import ConfigError

COMMON = ("*/tests/*", "*.pyi", "*.pyx", "*.pxd", "*.h")
PRUNED = {
    "numpy": ("numpy/f2py/*", "numpy/distutils/*", "numpy/_core/include/*", "numpy/_core/lib/*",
              "numpy/_core/_simd.*", "numpy/_pyinstaller/*"),
    "ai_edge_litert": ("ai_edge_litert/libLiteRtWebGpuAccelerator.so", "ai_edge_litert/libLiteRt.so",
                       "ai_edge_litert/tools/*", "ai_edge_litert/vendors/*", "ai_edge_litert/aot/*"),
    "onnxruntime": ("onnxruntime/capi/libonnxruntime.so*", "onnxruntime/transformers/*", "onnxruntime/tools/*",
                    "onnxruntime/quantization/*"),
}
RECIPE = repr((COMMON, sorted(PRUNED.items()), "strip --strip-unneeded"))
STRIP = "strip"
MISSING_STRIP = ("strip is missing: apt-get install binutils-multiarch (it strips the edge images' shared objects "
                 "for every architecture)")


def distribution(wheel: Path) -> str:
    """A wheel's distribution name as its file names it (``ai_edge_litert`` of ``ai_edge_litert-2.3.0-...whl``)."""
    return wheel.name.split("-", 1)[0].lower()


def pruned(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def strippable(name: str) -> bool:
    """A shared object of the package itself; not one auditwheel vendored into ``<dist>.libs/``: those were
    rewritten by patchelf, and stripping them leaves load segments the loader refuses (seen with numpy's OpenBLAS)."""
    folder, _, base = name.rpartition("/")
    return (base.endswith(".so") or ".so." in base) and not folder.split("/", 1)[0].endswith(".libs")


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def _stripped(data: bytes, name: str, scratch: Path) -> bytes:
    path = scratch / "object.so"
    path.write_bytes(data)
    try:
        completed = subprocess.run([STRIP, "--strip-unneeded", str(path)], capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(MISSING_STRIP) from None
    if completed.returncode != 0:
        raise ConfigError(f"strip could not read {name} ({completed.stderr.strip()[-300:]}); a strip for "
                          "another architecture needs Debian's binutils-multiarch: apt-get install binutils-multiarch")
    return path.read_bytes()


def slim_wheel(wheel: Path, scratch: Path) -> tuple[int, int]:
    """Rewrite ``wheel`` in place without its pruned files and with stripped shared objects; (bytes before,
    bytes after) of its content, uncompressed."""
    patterns = COMMON + PRUNED.get(distribution(wheel), ())
    before = after = 0
    records: list[str] = []
    partial = wheel.with_suffix(".partial")
    try:
        with zipfile.ZipFile(wheel) as source, zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as target:
            record_name = next((info.filename for info in source.infolist()
                                if info.filename.endswith(".dist-info/RECORD")), None)
            for info in source.infolist():
                before += info.file_size
                if info.filename == record_name or info.is_dir() or pruned(info.filename, patterns):
                    continue
                data = source.read(info)
                if strippable(info.filename):
                    data = _stripped(data, info.filename, scratch)
                entry = zipfile.ZipInfo(info.filename, info.date_time)
                entry.external_attr, entry.compress_type = info.external_attr, zipfile.ZIP_DEFLATED
                target.writestr(entry, data)
                records.append(_record_line(info.filename, data))
                after += len(data)
            if record_name is not None:
                records.append(f"{record_name},,")
                target.writestr(record_name, "\n".join(records) + "\n")
    except BaseException:
        partial.unlink(missing_ok=True)  # the wheel stays as it was
        raise
    partial.replace(wheel)
    return before, after


def slim_wheelhouse(folder: Path) -> tuple[int, int]:
    """Slim every wheel in ``folder`` but pip's own; total (before, after) bytes of their content."""
    if shutil.which(STRIP) is None:
        raise ConfigError(MISSING_STRIP)
    totals = [0, 0]
    with tempfile.TemporaryDirectory(prefix="edgeloop-strip-") as scratch:
        for wheel in sorted(folder.glob("*.whl")):
            if wheel.name == "pip.whl":
                continue
            before, after = slim_wheel(wheel, Path(scratch))
            totals[0] += before
            totals[1] += after
    return totals[0], totals[1]
