"""Image tags and the semantic version of a model image, derived from the registry's history.

Tag: ``model-v<major>.<minor>.<patch>-<optimisation>-<runtime>-<arch>``, for example
``model-v2.1.0-int8-pruned-tflite-arm64`` for variant ``tflite_int8_pruned`` on arm64. The version
compares the candidate with the newest release in the repository (read from the images' labels):

- **major**: the model's architecture changed (zoo entry, input shape or class labels): a device's
  callers may need to change too;
- **minor**: same architecture, new data version or new parameters;
- **patch**: same data and parameters: a repackaging (new base image, edge code, runtime pins) or a
  retrain with identical inputs;
- the same registered version built from the same recipe keeps its version: that image already exists.

The first release of a repository is 1.0.0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

TAG_PATTERN = re.compile(r"^model-v(?P<major>\d+)\.(?P<minor>\d+)\.(?P<patch>\d+)-(?P<optimisation>[a-z0-9-]+)-"
                         r"(?P<runtime>tflite|onnx)-(?P<arch>amd64|arm64)$")
# the labels a release is read back from (besides the org.opencontainers.image.* ones)
LABEL_PREFIX = "edgeloop."
IDENTITY_LABELS = ("model-identity", "recipe-sha256", "architecture", "data-version", "params-hash")


@dataclass(frozen=True, order=True)
class SemVer:
    major: int
    minor: int
    patch: int

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.patch}"

    @classmethod
    def parse(cls, text: str) -> SemVer:
        parts = text.removeprefix("v").split(".")
        if len(parts) != 3 or not all(part.isdigit() for part in parts):
            raise ValueError(f"{text!r} is not a semantic version (major.minor.patch)")
        return cls(*(int(part) for part in parts))

    def bump(self, part: str) -> SemVer:
        if part == "major":
            return SemVer(self.major + 1, 0, 0)
        if part == "minor":
            return SemVer(self.major, self.minor + 1, 0)
        return SemVer(self.major, self.minor, self.patch + 1)


def image_tag(version: SemVer, variant: str, arch: str) -> str:
    """``model-v1.2.0-int8-pruned-tflite-amd64`` for variant ``tflite_int8_pruned`` on amd64."""
    runtime, _, optimisation = variant.partition("_")
    return f"model-v{version}-{optimisation.replace('_', '-')}-{runtime}-{arch}"


@dataclass(frozen=True)
class Release:
    """What an image in the registry (or a candidate image) is, as far as versioning goes."""

    version: SemVer | None  # None for a candidate
    arch: str
    model_identity: str  # sha256 over the registered version (name, number) and every model file it ships
    recipe_sha256: str  # Dockerfile, edge/ code, pinned runtime wheels and base image
    architecture: str   # zoo entry, input shape and labels
    data_version: str
    params_hash: str

    def labels(self) -> dict[str, str]:
        return {f"{LABEL_PREFIX}{name}": getattr(self, name.replace("-", "_")) for name in IDENTITY_LABELS}

    @classmethod
    def from_image(cls, tag: str, labels: dict[str, str]) -> Release | None:
        """The release an image's tag and labels describe; None when it is not an edgeloop model image."""
        match = TAG_PATTERN.match(tag)
        keys = [f"{LABEL_PREFIX}{name}" for name in IDENTITY_LABELS]
        if match is None or any(key not in labels for key in keys):
            return None
        version = SemVer(int(match["major"]), int(match["minor"]), int(match["patch"]))
        return cls(version, match["arch"], *(labels[key] for key in keys))


def next_version(history: list[Release], candidates: list[Release]) -> tuple[SemVer, str]:
    """The version the images of one package run get (one per platform), and why, given ``history``."""
    for candidate in candidates:
        for release in history:
            if (release.model_identity, release.recipe_sha256) == (candidate.model_identity, candidate.recipe_sha256):
                return release.version, f"this model built from this recipe is already released as {release.version}"
    candidate = candidates[0]  # the platforms of one run share model, data and parameters
    if not history:
        return SemVer(1, 0, 0), "first release in this repository"
    latest = max(history, key=lambda release: release.version)
    if candidate.architecture != latest.architecture:
        return latest.version.bump("major"), f"model architecture changed since {latest.version}"
    changed = [name for name, before, now in (("data", latest.data_version, candidate.data_version),
                                             ("parameters", latest.params_hash, candidate.params_hash))
               if before != now]
    if changed:
        return latest.version.bump("minor"), f"new {' and '.join(changed)} since {latest.version}"
    return latest.version.bump("patch"), f"same data and parameters as {latest.version}: repackaged"
