"""The platforms edge images are built for, and what each one's image is made of.

- amd64: ``linux/amd64``, wheels for x86_64, Debian amd64, the host here; LiteRT from ai-edge-litert;
- arm64: ``linux/arm64``, aarch64, Debian arm64, emulated as a Cortex-A72 (Raspberry Pi 4); ai-edge-litert;
- armv7: ``linux/arm/v7``, armv7l, Debian armhf, emulated as a Cortex-A7 (industrial controllers); LiteRT from
  tflite-runtime 2.14 (manylinux_2_34).

32-bit ARM has no CPython 3.11 wheels of ai-edge-litert, onnxruntime, numpy, uvloop or httptools. Its image
takes LiteRT's interpreter from ``tflite-runtime`` (the same API, :func:`edge.runtime.runtime_module`), numpy from
Debian's armhf ``python3-numpy`` (1.24, with its BLAS and LAPACK) in the runtime root, and runs uvicorn on
asyncio and h11 (uvloop and httptools are optional speed-ups). ONNX Runtime has no armv7 build at all: an ONNX
variant for armv7 is refused, naming the package and the platform (:class:`PlatformUnavailable`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tasks.errors import ConfigError

MANYLINUX = ("manylinux_2_28", "manylinux_2_27", "manylinux_2_17", "manylinux2014")
RUNTIME_REQUIREMENTS = {"tflite": "ai-edge-litert", "onnx": "onnxruntime"}


class PlatformUnavailable(ConfigError):
    """What an image for a platform needs does not exist for it (a wheel, a Debian package): names both."""

    def __init__(self, platform: str, package: str, detail: str) -> None:
        super().__init__(f"{package} is not available for {platform}: {detail}")
        self.platform, self.package = platform, package


@dataclass(frozen=True)
class ImagePlatform:
    docker: str                 # the OCI platform: linux/arm/v7
    arch: str                   # what image tags and version tags call it: armv7 (image.armv7)
    debian_arch: str            # the Debian architecture of its root file system: armhf
    pip_machine: str            # the wheel tags' machine: armv7l
    qemu: str | None = None     # the user-mode emulator that runs it on another host
    emulated_cpu: str = ""      # QEMU_CPU: a real core of the class (qemu's default offers extensions it lacks)
    cpuinfo_core: str = ""      # one core's /proc/cpuinfo block matching that CPU (the runtimes' CPU detection)
    manylinux: tuple[str, ...] = MANYLINUX  # wheel tags accepted (Debian 12: glibc 2.36)
    runtimes: dict[str, str] = field(default_factory=lambda: dict(RUNTIME_REQUIREMENTS))  # runtime -> wheel
    no_wheel: tuple[str, ...] = ()          # edge requirements without a wheel here: optional or from Debian
    debian_packages: tuple[str, ...] = ("python3",)  # the runtime root's packages (beyond what debootstrap takes)

    @property
    def debian_python(self) -> bool:
        """Whether Python packages come from Debian's dist-packages too (numpy on armv7)."""
        return any(package.startswith("python3-") for package in self.debian_packages)

    def runtime_requirement(self, runtime: str) -> str:
        """The wheel that brings ``runtime`` here; :class:`PlatformUnavailable` when there is none."""
        if runtime not in self.runtimes:
            wanted = RUNTIME_REQUIREMENTS.get(runtime, runtime)
            raise PlatformUnavailable(self.docker, wanted, f"it has no CPython 3.11 build for {self.pip_machine}; "
                                      f"choose a {'/'.join(sorted(self.runtimes))} variant for this device class "
                                      "or take the platform out of package.platforms")
        return self.runtimes[runtime]


ARM64_CORE = ("BogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
              "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n")
ARMV7_CORE = ("model name\t: ARMv7 Processor rev 5 (v7l)\nBogoMIPS\t: 48.00\nFeatures\t: half thumb fastmult vfp "
              "edsp neon vfpv3 tls vfpv4 idiva idivt vfpd32 lpae evtstrm\nCPU implementer\t: 0x41\n"
              "CPU architecture: 7\nCPU variant\t: 0x0\nCPU part\t: 0xc07\nCPU revision\t: 5\n\n")

PLATFORMS = {platform.docker: platform for platform in (
    ImagePlatform("linux/amd64", "amd64", "amd64", "x86_64"),
    ImagePlatform("linux/arm64", "arm64", "arm64", "aarch64", "qemu-aarch64-static", "cortex-a72", ARM64_CORE),
    ImagePlatform("linux/arm/v7", "armv7", "armhf", "armv7l", "qemu-arm-static", "cortex-a7", ARMV7_CORE,
                  manylinux=("manylinux_2_36", "manylinux_2_35", "manylinux_2_34", "manylinux_2_31", *MANYLINUX),
                  runtimes={"tflite": "tflite-runtime"}, no_wheel=("numpy", "uvloop", "httptools"),
                  debian_packages=("python3", "python3-numpy")),
)}
BY_ARCH = {platform.arch: platform for platform in PLATFORMS.values()}


def image_platform(docker_platform: str) -> ImagePlatform:
    """The platform ``docker_platform`` names; ConfigError listing the supported ones otherwise."""
    try:
        return PLATFORMS[docker_platform]
    except KeyError:
        raise ConfigError(f"platform {docker_platform!r} is not supported; use one of {sorted(PLATFORMS)}") from None


def by_arch(arch: str) -> ImagePlatform:
    try:
        return BY_ARCH[arch]
    except KeyError:
        raise ConfigError(f"architecture {arch!r} is not supported; use one of {sorted(BY_ARCH)}") from None


def host_arch() -> str:
    """The host's architecture as images name it (amd64, arm64, armv7): no dpkg needed, so any Linux host packages."""
    import platform

    machine = platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "armv7"}.get(machine, machine)
