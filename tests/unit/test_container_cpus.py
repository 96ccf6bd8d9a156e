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
