"""Which images a per-device-class release needs, and where the version records them.

A registered version that chose a variant per device class (``device.<class>.variant``,
:mod:`tasks.registry.device_choice`) needs, besides the registered variant's image on every platform of
``package.platforms``, an image of each other chosen variant on the platforms of the classes that run it,
carrying that variant's runtime: one image per (variant, platform), shared by every class on it. A class on
a platform the run does not build (one left out of ``package.platforms``) gets none, and says so in the log.

Each class's image is tagged on the version as ``device.<class>.image.<arch>`` (pinned by digest), which is
what the rollout sends that class's container devices (:func:`tasks.rollout.records.release_of`).
"""

from __future__ import annotations

import logging

from tasks.devices import DeviceInventory
from tasks.packaging.platforms import PLATFORMS
from tasks.registry.bundle import chosen_variants

log = logging.getLogger(__name__)
PLATFORM_OF_CPU = {platform.pip_machine: docker for docker, platform in PLATFORMS.items()}  # devices.yaml cpu_arch


def image_targets(tags: dict[str, str], inventory: DeviceInventory, platforms: list[str],
                  registered: str) -> dict[str, dict[str, list[str]]]:
    """variant -> platform -> the device classes that image serves; the registered variant first, on every
    platform of ``platforms`` (also where no class runs it: devices outside the inventory do)."""
    targets: dict[str, dict[str, list[str]]] = {registered: {platform: [] for platform in platforms}}
    variants = chosen_variants(tags)
    for device in inventory.devices:
        chosen = variants.get(device.name)
        if chosen in (None, "none"):
            continue
        platform = PLATFORM_OF_CPU.get(device.cpu_arch, device.cpu_arch)
        if platform not in platforms:
            log.info("device class %s (%s) gets no image of this version: %s is not in package.platforms; its "
                     "devices take its variant's bundle only", device.name, chosen, platform)
            continue
        targets.setdefault(chosen, {}).setdefault(platform, []).append(device.name)
    return targets


def class_image_tag(device_class: str, arch: str) -> str:
    return f"device.{device_class}.image.{arch}"


def class_images_of(tags: dict[str, str], device_class: str) -> dict[str, str]:
    """The images packaged for ``device_class``, by architecture (its ``device.<class>.image.<arch>`` tags)."""
    from edge.rollout import ARCH, DIGEST_REFERENCE

    prefix = f"device.{device_class}.image."
    found = {key.removeprefix(prefix): value for key, value in tags.items() if key.startswith(prefix)}
    return {arch: value for arch, value in found.items() if ARCH.fullmatch(arch) and DIGEST_REFERENCE.fullmatch(value)}
