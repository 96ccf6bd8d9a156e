"""The docker runner's CPU quota: a device profile with more CPUs than the host (a 4-core Pi on a 2-core CI host)
gets the host's CPUs instead of an engine refusal, and says so."""

from __future__ import annotations

import logging

from tasks.benchmark.runners import container_cpus


def test_a_quota_over_the_hosts_cpus_is_capped_and_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.benchmark.runners"):
        assert container_cpus("rpi4-8gb", 4.0, host_cpus=2) == 2.0
    assert "rpi4-8gb: runner.cpus 4 is more than this host's 2 CPUs" in caplog.text


def test_a_quota_the_host_can_give_is_unchanged(caplog):
    with caplog.at_level(logging.WARNING, logger="tasks.benchmark.runners"):
        assert container_cpus("industrial-256mb", 1.0, host_cpus=2) == 1.0
        assert container_cpus("x86-gateway", None, host_cpus=2) is None
    assert caplog.text == ""


def test_the_docker_runner_measures_in_the_newest_image_of_the_devices_runtime(monkeypatch):
    """Images carry one runtime each (a class's variant decides): a Pi (LiteRT) is measured in the newest LiteRT
    image even when an ONNX Runtime image for another arm64 class was pushed after it; without one, the newest."""
    from tasks.benchmark.runners import newest_image
    from tasks.packaging import oci_registry

    images = {"v2-tflite-int8-arm64": ("tflite", "2026-12-07T10:00"),
              "v2-onnx-int8-arm64": ("onnx", "2026-12-07T11:00"),
              "v1-tflite-int8-arm64": ("tflite", "2026-12-06T10:00"),
              "v2-tflite-int8-amd64": ("tflite", "2026-12-08")}

    class Registry:
        def __init__(self, address: str) -> None:
            self.address = address

        def tags(self, repository: str) -> list[str]:
            return list(images)

        def labels(self, repository: str, tag: str) -> dict[str, str]:
            runtime, created = images[tag]
            return {"edgeloop.runtime": runtime, "org.opencontainers.image.created": created,
                    "edgeloop.platform": f"linux/{tag.rsplit('-', 1)[1]}"}

    monkeypatch.setattr(oci_registry, "Registry", Registry)
    assert newest_image("r:5000", "edge", "linux/arm64", "tflite") == "r:5000/edge:v2-tflite-int8-arm64"
    assert newest_image("r:5000", "edge", "linux/arm64", "onnx") == "r:5000/edge:v2-onnx-int8-arm64"
    assert newest_image("r:5000", "edge", "linux/arm64") == "r:5000/edge:v2-onnx-int8-arm64"
    assert newest_image("r:5000", "edge", "linux/arm/v7", "tflite") is None
