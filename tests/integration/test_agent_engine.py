"""The device agent's Docker Engine client (edge/agent/engine.py) against the project's real dockerd and registry:
an image pushed to the registry is pulled back by digest, run with its service published on loopback, read
from, and removed; references not pinned by digest, digests the registry lacks, and a container that exits
at once are named."""

from __future__ import annotations

import os

import httpx
import pytest

from edge.agent.engine import ContainerSpec, Engine, EngineError
from tests.stack_helpers import wait_for

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pushed(images) -> str:
    """The amd64 Python base image, pushed to the session's registry; its digest reference."""
    from tasks.packaging.base_images import ensure_base_image
    from tasks.packaging.docker_client import connect, push

    engine = connect()
    try:
        base = ensure_base_image("amd64", engine)
        repository = f"{images.registry}/edgeloop/agent-test"
        engine.client.images.get(base).tag(repository, tag="one")
        return f"{repository}@{push(engine.client, repository, 'one')}"
    finally:
        engine.close()


def test_pull_by_digest_run_read_and_remove(pushed, tmp_path) -> None:
    engine = Engine(os.environ["DOCKER_HOST"])
    served = tmp_path / "served"
    served.mkdir()
    (served / "hello.txt").write_text("from the device's store\n")
    try:
        assert engine.pull(pushed).startswith("sha256:")
        running = engine.run(ContainerSpec(pushed, "edgeloop-agent-test", binds=[f"{served}:/srv:ro"],
                                           command=["python3", "-m", "http.server", "8080", "-d", "/srv"],
                                           memory_mb=128, cpus=0.5))
        try:
            assert engine.running(running.id)
            body = wait_for(lambda: _get(f"http://127.0.0.1:{running.port}/hello.txt"), 30, "the service")
            assert body == "from the device's store\n"
        finally:
            engine.remove(running.id)
        assert not engine.running(running.id)
        engine.remove(running.id)  # gone already: nothing to do
    finally:
        engine.close()


def test_bad_references_and_a_container_that_exits_are_named(pushed) -> None:
    engine = Engine(os.environ["DOCKER_HOST"])
    try:
        with pytest.raises(EngineError, match="not pinned by digest"):
            engine.pull(pushed.split("@")[0] + ":one")
        missing = pushed.split("@")[0] + "@sha256:" + "0" * 64
        with pytest.raises(EngineError, match="pulling"):
            engine.pull(missing)
        crashed = engine.run(ContainerSpec(pushed, "edgeloop-agent-crash",
                                           command=["python3", "-c", "import sys, time; print('no model', flush=True); "
                                                    "time.sleep(1); sys.exit(3)"]))
        try:
            wait_for(lambda: not engine.running(crashed.id), 30, "the container to exit")
            assert "no model" in engine.logs(crashed.id)
        finally:
            engine.remove(crashed.id)
        with pytest.raises(EngineError, match="unix socket"):
            Engine("tcp://127.0.0.1:2375")
    finally:
        engine.close()


def _get(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=2)
    except httpx.HTTPError:
        return None
    return response.text if response.status_code == 200 else None
