"""The compose control plane's default images are the ones `edgeloop base-images --control-plane` builds."""

from __future__ import annotations

import re

import yaml

from tasks.packaging.control_plane_images import DEBIAN_IMAGES, DOCKER_DIR, PYTHON_IMAGE
from tests.conftest import REPO_ROOT


def _defaults() -> dict[str, str]:
    """``EDGELOOP_*_IMAGE`` -> its default in docker/compose.control-plane.yml."""
    text = (DOCKER_DIR / "compose.control-plane.yml").read_text()
    return dict(re.findall(r"\$\{(EDGELOOP_[A-Z]+_IMAGE):-([^}]+)\}", text))


def test_every_default_image_is_one_we_build_and_every_service_uses_a_setting():
    defaults = _defaults()
    assert defaults == {"EDGELOOP_POSTGRES_IMAGE": DEBIAN_IMAGES["postgres"],
                        "EDGELOOP_REDIS_IMAGE": DEBIAN_IMAGES["redis"], "EDGELOOP_PREFECT_IMAGE": PYTHON_IMAGE,
                        "EDGELOOP_MLFLOW_IMAGE": PYTHON_IMAGE, "EDGELOOP_MOSQUITTO_IMAGE": DEBIAN_IMAGES["mosquitto"],
                        "EDGELOOP_REGISTRY_IMAGE": DEBIAN_IMAGES["registry"],
                        "EDGELOOP_PROMETHEUS_IMAGE": DEBIAN_IMAGES["prometheus"]}
    services = yaml.safe_load((DOCKER_DIR / "compose.control-plane.yml").read_text())["services"]
    assert all("${EDGELOOP_" in str(service["image"]) or service["image"] in defaults.values()
               for service in services.values()), "a service whose image is not selectable"


def test_each_debian_image_has_its_target_and_the_python_image_names_the_locked_versions():
    dockerfile = (DOCKER_DIR / "control-plane-debian.Dockerfile").read_text()
    assert set(re.findall(r"^FROM \S+ AS (\w+)$", dockerfile, re.MULTILINE)) == set(DEBIAN_IMAGES)
    lock = dict(line.split("==") for line in (REPO_ROOT / "requirements.lock").read_text().splitlines()
                if "==" in line)
    assert PYTHON_IMAGE.endswith(f"prefect-{lock['prefect']}-mlflow-{lock['mlflow']}")
