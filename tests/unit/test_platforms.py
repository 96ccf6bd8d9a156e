"""The platform table edge images are built from: armv7's substitutes, and what a missing package says."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest

from edge import runtime as edge_runtime
from tasks.errors import ConfigError
from tasks.packaging.base_images import _link_alternatives
from tasks.packaging.docker_client import emulated_cpuinfo
from tasks.packaging.image_build import wheelhouse
from tasks.packaging.platforms import PLATFORMS, PlatformUnavailable, by_arch, image_platform


def test_an_onnx_image_for_armv7_names_the_package_and_the_platform_and_downloads_nothing(tmp_path):
    with pytest.raises(PlatformUnavailable) as refused:
        wheelhouse("linux/arm/v7", ["onnx"], tmp_path)
    assert "onnxruntime is not available for linux/arm/v7" in str(refused.value)
    assert "tflite variant" in str(refused.value) and "package.platforms" in str(refused.value)
    assert (refused.value.platform, refused.value.package) == ("linux/arm/v7", "onnxruntime")
    assert not (tmp_path / "wheelhouse").exists()


def test_an_unknown_platform_lists_the_supported_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"'linux/s390x' is not supported; use one of \['linux/amd64'"):
        wheelhouse("linux/s390x", ["tflite"], tmp_path)
    with pytest.raises(ConfigError, match="architecture 'riscv64' is not supported"):
        by_arch("riscv64")


def test_armv7_takes_litert_from_tflite_runtime_and_numpy_from_debian():
    armv7 = image_platform("linux/arm/v7")
    assert (armv7.arch, armv7.debian_arch, armv7.pip_machine, armv7.qemu) == ("armv7", "armhf", "armv7l",
                                                                               "qemu-arm-static")
    assert armv7.runtime_requirement("tflite") == "tflite-runtime" and "numpy" in armv7.no_wheel
    assert armv7.debian_python and "python3-numpy" in armv7.debian_packages
    assert "manylinux_2_34" in armv7.manylinux  # tflite-runtime 2.14's armv7l wheel; bookworm has glibc 2.36
    assert not PLATFORMS["linux/amd64"].debian_python and PLATFORMS["linux/amd64"].no_wheel == ()


def test_each_emulated_platform_sees_a_real_core_of_its_class():
    armv7, arm64 = emulated_cpuinfo(2, "linux/arm/v7"), emulated_cpuinfo(1)
    assert armv7.count("processor\t:") == 2 and "CPU architecture: 7" in armv7 and " neon " in armv7
    assert "CPU part\t: 0xc07" in armv7 and image_platform("linux/arm/v7").emulated_cpu == "cortex-a7"
    assert "CPU architecture: 8" in arm64 and "CPU part\t: 0xd08" in arm64  # Cortex-A72


def test_the_blas_and_lapack_alternatives_are_linked_as_their_maintainer_scripts_would(tmp_path):
    library_dir = tmp_path / "usr" / "lib" / "arm-linux-gnueabihf"
    for target in ("blas/libblas.so.3", "lapack/liblapack.so.3"):
        (library_dir / target).parent.mkdir(parents=True)
        (library_dir / target).write_bytes(b"\x7fELF")
    _link_alternatives(tmp_path)
    assert Path.readlink(library_dir / "libblas.so.3") == Path("blas/libblas.so.3")  # relative: valid in the image
    assert (library_dir / "liblapack.so.3").read_bytes() == b"\x7fELF"
    _link_alternatives(tmp_path)  # again: nothing changes, nothing fails


def test_without_ai_edge_litert_the_model_runs_on_tflite_runtime(tmp_path, monkeypatch, tiny_model_files, digits):
    """armv7 has tflite-runtime only. Stand-in: ai_edge_litert hidden from the finder, and a ``tflite_runtime``
    package that re-exports this venv's interpreter (the real one runs in the armv7 image's integration test)."""
    from edge.runtime import EdgeModel

    reference = EdgeModel.load(tiny_model_files["tflite_int8"]).predict(digits.x[:8])
    package = tmp_path / "tflite_runtime"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "interpreter.py").write_text("from ai_edge_litert.interpreter import Interpreter, OpResolverType\n"
                                            "LOADED_THROUGH_FALLBACK = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    real_find_spec = edge_runtime.find_spec
    monkeypatch.setattr(edge_runtime, "find_spec",
                        lambda name: None if name == "ai_edge_litert" else real_find_spec(name))
    assert edge_runtime.runtime_module("tflite") == "tflite_runtime.interpreter"
    assert edge_runtime.installed_runtimes()[0] == "tflite"
    answer = EdgeModel.load(tiny_model_files["tflite_int8"]).predict(digits.x[:8])
    assert sys.modules["tflite_runtime.interpreter"].LOADED_THROUGH_FALLBACK
    np.testing.assert_allclose(answer, reference, atol=1e-6)
    monkeypatch.setattr(edge_runtime, "find_spec", lambda name: None)
    assert edge_runtime.runtime_module("tflite") is None and edge_runtime.installed_runtimes() == ()


def test_a_device_names_its_architecture_as_the_images_of_its_platform_are_named(monkeypatch):
    """An armv7 device's updater looks up the rollout's ``images["armv7"]``, which packaging tags."""
    import platform

    from edge.updater.daemon import host_arch as device_arch
    from tasks.packaging.platforms import host_arch

    for machine, arch in (("x86_64", "amd64"), ("aarch64", "arm64"), ("armv7l", "armv7")):
        monkeypatch.setattr(platform, "machine", lambda machine=machine: machine)
        assert device_arch() == host_arch() == arch == image_platform(by_arch(arch).docker).arch


def test_a_debian_package_the_archive_lacks_is_named_with_the_platform(tmp_path, monkeypatch):
    """Stand-in for debootstrap (a real run downloads the armhf archive's index, ~10 MB): a script that fails as
    debootstrap 1.0.128+nmu2+deb12u2 did here on 2026-12-08 for ``--include=python3-nonexistent-xyz --arch=armhf``."""
    from tasks.errors import ServiceUnavailable
    from tasks.packaging.base_images import _debootstrap

    fake = tmp_path / "bin" / "debootstrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'I: Retrieving InRelease'\n"
                    "echo \"E: Couldn't find these debs: python3-nonexistent-xyz\" >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    with pytest.raises(PlatformUnavailable) as refused:
        _debootstrap(["--foreign", "--arch=armhf", "bookworm", str(tmp_path / "root")], "armv7", "armhf")
    assert (refused.value.package, refused.value.platform) == ("python3-nonexistent-xyz", "linux/arm/v7")
    assert "Debian bookworm has no such package for armhf" in str(refused.value)
    fake.write_text("#!/bin/sh\necho 'E: Failed getting release file' >&2\nexit 1\n")  # the mirror, not a package
    with pytest.raises(ServiceUnavailable, match="is .* reachable"):
        _debootstrap(["--arch=armhf", "bookworm", str(tmp_path / "root")], "armv7", "armhf")
