"""Image benchmark: size of the edge image on every platform it is built for (amd64, arm64, armv7), cold start,
and the service under load in the 256 MB device's profile (LiteRT, the digits int8 model).

Builds each image exactly as ``edgeloop package`` does (build context, base images, BuildKit through the
Engine API), starting a dockerd and a registry the way the tests do when none is reachable and
stopping them afterwards; then starts the amd64 one 5 times with the ``package.check_device`` profile's cpus
and memory and takes the median time from ``docker run`` to the first 200 from ``/readyz`` (the arm64 and armv7
images start once under qemu in that profile: printed, labelled emulated, never a figure to gate); then runs the
amd64 one in that profile (1 CPU, 256 MB, no swap for industrial-256mb) under ``wrk`` load (concurrency 8,
``--load-seconds``) and reads the service's peak resident memory and whether anything was OOM-killed; the armv7
one (that device's own architecture) too, under qemu: its figures are the emulator's process, qemu's own memory
included, labelled ``_emulated``. The first run on a machine also builds the Debian base and runtime images and
resolves the wheelhouses (cached afterwards; not part of the figures). Last line: ``image_mb_amd64=<x>
image_mb_arm64=<y> image_mb_armv7=<v> cold_start_s=<z> serve_peak_rss_mb_256m=<p>
serve_peak_rss_mb_256m_armv7_emulated=<q> oom_killed=<0|1>``. Targets: at most 150 MB each, 5 s, no OOM kill.

    .venv/bin/python bench/image.py [--runs 5] [--platforms linux/amd64 linux/arm64 linux/arm/v7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from serve import build_int8_model, wrk  # noqa: E402  (bench/serve.py, beside this script)

from tasks.config import load_params  # noqa: E402
from tasks.devices import load_devices  # noqa: E402
from tasks.packaging import docker_client as docker_engine  # noqa: E402
from tasks.packaging.base_images import enable_emulation, host_arch  # noqa: E402
from tasks.packaging.docker_client import CACHE_DIR  # noqa: E402
from tasks.packaging.image_build import REPO_ROOT, build_context, resolve_base_image  # noqa: E402
from tasks.packaging.oci_registry import Registry  # noqa: E402
from tasks.packaging.platforms import image_platform  # noqa: E402
from tasks.stack import services  # noqa: E402

PLATFORM = "linux/amd64"
LOADED_FOREIGN = ("armv7",)  # the 256 MB device's architecture is also loaded, under qemu (labelled emulated)


@contextmanager
def image_engine(root: Path) -> Iterator[tuple]:
    """A dockerd and a registry of this script's own (under ``root``), as the tests start them: (engine, registry);
    stopped afterwards, ``DOCKER_HOST`` restored."""
    saved_host = os.environ.get("DOCKER_HOST")
    os.environ["DOCKER_HOST"] = services.start_docker_engine(root / "run")
    registry = Registry(f"127.0.0.1:{services.free_port()}")
    services.start_registry(root / "run", int(registry.address.rsplit(":", 1)[1]))
    engine = docker_engine.connect()
    try:
        yield engine, registry
    finally:
        engine.close()
        services.stop("registry", root / "run")
        services.stop("dockerd", root / "run")  # only a dockerd this script started
        if saved_host is None:
            os.environ.pop("DOCKER_HOST", None)
        else:
            os.environ["DOCKER_HOST"] = saved_host


def build_image(engine, registry, settings, bundle: Path, public: Path, platform: str, root: Path) -> str:
    """``bundle``'s image for ``platform`` built as ``edgeloop package`` builds it (not pushed); its tag."""
    arch = image_platform(platform).arch
    if arch != host_arch():
        enable_emulation(arch)
    context = root / f"context-{arch}"
    context.mkdir()
    build_context(bundle, [public], platform, CACHE_DIR, context)
    base, runtime_base = resolve_base_image(engine, settings.base_image, arch, registry)
    tag = f"{registry.address}/edgeloop/bench:image-{arch}"
    docker_engine.build(engine.client, context, tag, platform, base, {"edgeloop.bench": "image"},
                        runtime_base=runtime_base)
    print(f"{arch}: built on {runtime_base} (builder {base})")
    return tag


def _measure(engine, registry, settings, device, bundle: Path, public: Path, platform: str, root: Path,
             runs: int, starts: list[float], load: dict) -> float:
    """Build ``bundle``'s image for ``platform`` (:func:`build_image`); its size (MB). The host's image is started
    ``runs`` times under the check device's profile (appended to ``starts``) and then loaded (:func:`_under_load`);
    another architecture's starts once under qemu in that profile, and armv7's is loaded there too (emulated:
    ``load[arch]``)."""
    arch = image_platform(platform).arch
    tag = build_image(engine, registry, settings, bundle, public, platform, root)
    size = docker_engine.image_mb(engine.client, tag)
    print(f"{arch}: {size:.1f} MB")
    profile = f"--cpus {device.runner.cpus} --memory {device.runner.memory_mb}m, {settings.check_device}"
    try:
        if arch != host_arch():
            with docker_engine.running(engine.client, tag, platform, device.runner.cpus, device.runner.memory_mb,
                                       240, emulated=True) as started:
                print(f"{arch}: ready in {started.ready_s:.2f} s ({profile}; emulated: qemu, not a device figure)")
        else:
            for run in range(runs):
                with docker_engine.running(engine.client, tag, platform, device.runner.cpus,
                                           device.runner.memory_mb, 60) as container:
                    starts.append(container.ready_s)
                print(f"run {run + 1}: ready in {container.ready_s:.2f} s ({profile})")
        if load.get("seconds") and (arch == host_arch() or arch in LOADED_FOREIGN):
            figures = _under_load(engine, tag, platform, device, load["sample"], load["seconds"], root)
            load[arch] = figures
            emulated = "" if arch == host_arch() else " (emulated: the qemu process's memory, the emulator's included)"
            print(f"{arch} under load for {load['seconds']:g} s in {settings.check_device}'s profile ({profile}, no "
                  f"swap): {figures['rps']:.0f} requests/s, peak RSS {figures['peak_rss_mb']:.1f} MB{emulated}, "
                  f"OOM-killed: {figures['oom_killed']}")
        return size
    finally:
        engine.client.images.remove(tag, force=True)


def _under_load(engine, tag: str, platform: str, device, sample: list, seconds: float, scratch: Path) -> dict:
    """The image in the device's profile (its cpus, its memory, no swap; under qemu when foreign) under ``wrk`` at
    concurrency 8 for ``seconds``: requests/s, the service's peak resident memory (VmHWM of the container's main
    process, read on the host) and whether the kernel killed anything in the container for memory (OOMKilled)."""
    import json

    emulated = image_platform(platform).arch != host_arch()
    with docker_engine.running(engine.client, tag, platform, device.runner.cpus, device.runner.memory_mb,
                               240 if emulated else 60, emulated=emulated) as container:
        pid = engine.client.containers.get(container.container.id).attrs["State"]["Pid"]
        load = wrk(f"{container.url}/v1/predict", json.dumps({"inputs": sample}), 8, seconds, scratch)
        status = Path(f"/proc/{pid}/status").read_text()
        peak_mb = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
        state = engine.client.containers.get(container.container.id).attrs["State"]
    return {"rps": load["rps"], "peak_rss_mb": peak_mb, "oom_killed": bool(state["OOMKilled"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--platforms", nargs="+", default=["linux/amd64", "linux/arm64", "linux/arm/v7"])
    parser.add_argument("--load-seconds", type=float, default=20.0, help="wrk load on the host's image in the profile")
    args = parser.parse_args(argv)
    from sklearn.datasets import load_digits

    from tasks.registry.bundle import bundle_from_files, generate_keypair, load_private_key

    settings = load_params(REPO_ROOT / "params.yaml").package
    device = load_devices(REPO_ROOT / "devices.yaml").get(settings.check_device)
    with tempfile.TemporaryDirectory(prefix="edgeloop-bench-image-") as scratch, \
            image_engine(Path(scratch)) as (engine, registry):
        root = Path(scratch)
        digits = load_digits()
        x = (digits.images / 16.0).astype("float32")[..., None]
        model = build_int8_model("digits_cnn", (8, 8, 1), root, x[:1200], digits.target[:1200])
        private, public = generate_keypair(root / "keys", "bench")
        bundle = bundle_from_files(root / "bundle.tar.gz", "v1", "bench", "1", None, {"primary": model},
                                   x[1200:1216], load_private_key(private))
        sizes, starts = {}, []
        load = {"seconds": args.load_seconds, "sample": x[1200:1201].tolist()}
        for platform in args.platforms:
            sizes[image_platform(platform).arch] = _measure(engine, registry, settings, device, bundle, public,
                                                            platform, root, args.runs, starts, load)
    cold_start = f"{statistics.median(starts):.2f}" if starts else "none"
    print(f"cold start median of {len(starts)}: {cold_start} s (target <= {settings.max_start_s:g}); "
          f"size target <= {settings.max_image_mb:g} MB")
    image_sizes = " ".join(f"image_mb_{arch}={mb:.1f}" for arch, mb in sizes.items())
    loaded = {arch: value for arch, value in load.items() if isinstance(value, dict)}
    under_load = "".join(
        f" serve_peak_rss_mb_256m{'' if arch == host_arch() else f'_{arch}_emulated'}={value['peak_rss_mb']:.1f}"
        for arch, value in loaded.items())
    if loaded:
        under_load += f" oom_killed={int(any(value['oom_killed'] for value in loaded.values()))}"
    print(f"{image_sizes} cold_start_s={cold_start}{under_load}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
