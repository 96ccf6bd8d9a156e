"""A Docker/OCI image registry read through its HTTP API v2: is it there, and what was released to it.

Loopback registries (``127.0.0.1``, ``localhost``) are spoken to over plain HTTP, as the Docker
engine does; any other address over HTTPS. Registries that require a login are not supported yet.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import httpx

from tasks.errors import ServiceUnavailable
from tasks.packaging.image_version import TAG_PATTERN, Release

MANIFEST_TYPES = ", ".join(("application/vnd.docker.distribution.manifest.v2+json",
                            "application/vnd.oci.image.manifest.v1+json"))
LOOPBACK = ("127.0.0.1", "localhost", "[::1]")


@dataclass(frozen=True)
class Registry:
    address: str  # host[:port]
    timeout_s: float = 10.0

    @property
    def url(self) -> str:
        host = self.address.rsplit(":", 1)[0] if self.address.count(":") == 1 else self.address
        return f"{'http' if host in LOOPBACK else 'https'}://{self.address}"

    def _get(self, path: str, **headers: str) -> httpx.Response:
        try:
            return httpx.get(f"{self.url}{path}", headers=headers, timeout=self.timeout_s)
        except httpx.HTTPError as error:
            raise ServiceUnavailable(
                f"image registry {self.address} is unreachable ({type(error).__name__}: {error}): start it "
                "(edgeloop services up --images) or set package.registry / EDGELOOP_REGISTRY") from error

    def check(self) -> None:
        """Raise :class:`ServiceUnavailable` unless the registry answers its API without a login."""
        response = self._get("/v2/")
        if response.status_code == 401:
            raise ServiceUnavailable(f"image registry {self.address} requires a login, which edgeloop does not "
                                     "support yet: use a registry without authentication on a trusted network")
        if response.status_code != 200:
            raise ServiceUnavailable(f"{self.url}/v2/ answered HTTP {response.status_code}: "
                                     f"{self.address} is not a Docker registry (API v2)")

    def tags(self, repository: str) -> list[str]:
        response = self._get(f"/v2/{repository}/tags/list")
        if response.status_code == 404:
            return []  # nothing pushed to this repository yet
        response.raise_for_status()
        return response.json().get("tags") or []

    def labels(self, repository: str, reference: str) -> dict[str, str]:
        """The image config labels of ``repository:reference`` (a tag or a digest)."""
        manifest = self._get(f"/v2/{repository}/manifests/{reference}", Accept=MANIFEST_TYPES)
        manifest.raise_for_status()
        config_digest = manifest.json()["config"]["digest"]
        blob = self._get(f"/v2/{repository}/blobs/{config_digest}")
        blob.raise_for_status()
        return json.loads(blob.content).get("config", {}).get("Labels") or {}

    def digest(self, repository: str, tag: str) -> str | None:
        """The manifest digest ``tag`` points at, or None when there is no such tag."""
        response = self._get(f"/v2/{repository}/manifests/{tag}", Accept=MANIFEST_TYPES)
        return response.headers.get("Docker-Content-Digest") if response.status_code == 200 else None

    def releases(self, repository: str) -> list[Release]:
        """Every edgeloop model image in ``repository``, read back from its tag and labels."""
        releases = []
        for tag in self.tags(repository):
            if TAG_PATTERN.match(tag) and (release := Release.from_image(tag, self.labels(repository, tag))):
                releases.append(release)
        return releases
