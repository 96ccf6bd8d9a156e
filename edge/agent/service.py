"""The device's service container, replaced only by one that proved itself (the image part of a rollout).

A device that runs the packaged image keeps its service behind :class:`~edge.agent.proxy.SwitchableProxy` on
the device's service port. :meth:`ServiceContainer.update` takes the image a verified rollout manifest names
for this device's architecture and

1. pulls it by digest                                                          (failure: ``image_pull``)
2. starts it beside the running one, on a loopback port of its own              (``image_start``)
3. waits for its ``/readyz``; a container that exits meanwhile is ``image_start``, with its log
                                                                                (``image_not_ready``)
4. health-checks it: the target version's sample input through ``/v1/predict`` must be served by that
   version's primary model (no fallback) with the labels the bundle's manifest expects (``image_health``)
5. switches the front (new connections go to the new container), lets the old one's open connections
   drain, and removes it.

Any failure removes the new container and raises :class:`~edge.updater.fetch.RolloutFailed` with the reason
above: the old container never stopped serving, so no request fails during an attempt. The running
container is recorded in ``state_path`` so that a restarted agent takes it over instead of starting another.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np

from edge.agent.engine import ContainerSpec, Engine, EngineError, Running
from edge.agent.proxy import SwitchableProxy
from edge.store.health import read_sample
from edge.store.model_store import ModelStore
from edge.updater.fetch import RolloutFailed

log = logging.getLogger(__name__)
NPY_TYPE = "application/x-npy"


class ServiceContainer:
    """The service container behind ``proxy``, run from ``template`` (its ``image`` replaced on each update)."""

    def __init__(self, engine: Engine, proxy: SwitchableProxy, template: ContainerSpec, store: ModelStore,
                 state_path: Path, ready_timeout_s: float = 120.0, drain_timeout_s: float = 30.0,
                 request_timeout_s: float = 30.0) -> None:
        self.engine, self.proxy, self.template, self.store = engine, proxy, template, store
        self.state_path = state_path
        self.ready_timeout_s, self.drain_timeout_s, self.request_timeout_s = (ready_timeout_s, drain_timeout_s,
                                                                              request_timeout_s)
        self.current: Running | None = None

    # ---- the first start, or taking over what a previous agent left running ----------------------------

    def start(self, image: str) -> Running:
        """Serve ``image`` (or adopt the recorded container, when it still runs): the proxy forwards to it."""
        recorded = self._recorded()
        if recorded is not None and self.engine.running(recorded.id):
            log.info("taking over the running service container %s (%s)", recorded.name, recorded.image)
            self.current = recorded
        else:
            self.current = self._launch(image, version=None)
            self._record(self.current)
        self.proxy.switch(self.current.port)
        for leftover in set(self.engine.named(f"{re.escape(self.template.name)}-[0-9a-f]{{12}}-[0-9]+")) - {
                self.current.id}:
            log.warning("removing service container %s: an attempt a stopped agent left behind", leftover[:12])
            self.engine.remove(leftover)  # an exited recorded one, or a new one the agent died starting
        return self.current

    # ---- an update ---------------------------------------------------------------------------------------

    def update(self, image: str, version: str) -> bool:
        """Serve ``version`` from ``image``; False when that image already serves. Raises RolloutFailed."""
        if self.current is not None and self.current.image == image and self.engine.running(self.current.id):
            self._health_check(self.current, version)  # the model may have changed under the same image
            return False
        new = self._launch(image, version)
        old, self.current = self.current, new
        self.proxy.switch(new.port)
        self._record(new)
        if old is not None:
            self._retire(old)
        log.info("now serving %s from %s (container %s)", version, image, new.name)
        return True

    def confirm(self, version: str) -> None:
        """The running container serves ``version`` (a model-only change: it reloads the store's active version
        within its watch interval), answering its health sample; raises RolloutFailed."""
        if self.current is not None:
            self._health_check(self.current, version)

    def _launch(self, image: str, version: str | None) -> Running:
        """Pull, start, wait for readiness and (given ``version``) health-check; nothing left behind on failure."""
        try:
            self.engine.pull(image)
        except EngineError as error:
            raise RolloutFailed("image_pull", str(error)) from None
        name = f"{self.template.name}-{image.rsplit(':', 1)[1][:12]}-{int(time.time() * 1000) % 10**8}"
        try:
            running = self.engine.run(replace(self.template, image=image, name=name))
        except EngineError as error:
            raise RolloutFailed("image_start", str(error)) from None
        try:
            self._wait_ready(running)
            if version is not None:
                self._health_check(running, version)
        except RolloutFailed:
            self._remove_quietly(running)
            raise
        return running

    def _wait_ready(self, running: Running) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        url = f"http://127.0.0.1:{running.port}/readyz"
        while True:
            runs, restarts = self.engine.status(running.id)
            if not runs or restarts:  # it died before it was ready (and may have been restarted since)
                raise RolloutFailed("image_start", f"{running.image} exited before it was ready; its log ends:\n"
                                                   f"{self.engine.logs(running.id)}")
            try:
                if httpx.get(url, timeout=2.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise RolloutFailed("image_not_ready", f"{running.image} did not answer /readyz within "
                                                       f"{self.ready_timeout_s:.0f} s; its log ends:\n"
                                                       f"{self.engine.logs(running.id)}")
            time.sleep(0.25)

    def _health_check(self, running: Running, version: str) -> None:
        """The target version's sample, through the container's own API, must come back as the bundle says.

        A container already running reloads a version the store activated within its watch interval: until
        ``ready_timeout_s`` passes, an answer from the version before is waited out, not failed."""
        manifest = self.store.verified_manifest(version)
        sample = read_sample(self.store.version_dir(version), manifest)
        body = io.BytesIO()
        np.save(body, sample)
        deadline = time.monotonic() + self.ready_timeout_s
        while True:
            try:
                response = httpx.post(f"http://127.0.0.1:{running.port}/v1/predict", content=body.getvalue(),
                                      headers={"Content-Type": NPY_TYPE}, timeout=self.request_timeout_s)
                answer = response.json() if response.status_code == 200 else None
            except (httpx.HTTPError, ValueError) as error:
                raise RolloutFailed("image_health", f"{running.image}: /v1/predict failed ({error})") from None
            if answer is None:
                raise RolloutFailed("image_health", f"{running.image}: /v1/predict answered HTTP "
                                                    f"{response.status_code}: {response.text[:300]}")
            problem = _health_problem(answer, version, manifest.sample.expected_labels,
                                      manifest.sample.min_label_agreement)
            if not problem:
                return
            if answer.get("version") == version or time.monotonic() > deadline:
                raise RolloutFailed("image_health", f"{running.image}: {problem}")
            time.sleep(0.5)  # still on the version before: it reloads on its next look at the store

    def _retire(self, old: Running) -> None:
        """Wait (bounded) for the old container's open connections to end, stop it gracefully (requests in flight
        finish, idle keep-alive connections are closed, so their clients reconnect to the new one), remove it."""
        deadline = time.monotonic() + self.drain_timeout_s
        while self.proxy.connections_to(old.port) and time.monotonic() < deadline:
            time.sleep(0.1)
        try:
            self.engine.stop(old.id)
        except EngineError as error:
            log.error("could not stop container %s gracefully: %s", old.name, error)
        self._remove_quietly(old)

    def _remove_quietly(self, running: Running) -> None:
        try:
            self.engine.remove(running.id)
        except EngineError as error:
            log.error("could not remove container %s: %s", running.name, error)

    # ---- the record a restarted agent reads --------------------------------------------------------------

    def _record(self, running: Running) -> None:
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"id": running.id, "name": running.name, "image": running.image,
                                         "port": running.port}))
        os.replace(temporary, self.state_path)

    def _recorded(self) -> Running | None:
        try:
            data = json.loads(self.state_path.read_text())
            return Running(str(data["id"]), str(data["name"]), str(data["image"]), int(data["port"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


def _health_problem(answer: dict, version: str, expected: list[int], floor: float) -> str:
    """What is wrong with a ``/v1/predict`` answer to the health sample ('' when nothing is)."""
    try:
        served, fallback = answer["version"], answer.get("fallback")
        labels = [int(row["class_index"]) for row in answer["predictions"]]
    except (KeyError, TypeError, ValueError) as error:
        return f"/v1/predict answered an unexpected document ({error!r})"
    if served != version:
        return f"it serves {served}, the rollout installs {version}"
    if fallback:
        return f"it answered with its fallback ({fallback}), not the primary model"
    if len(labels) != len(expected):
        return f"{len(labels)} predictions for a sample of {len(expected)}"
    agreement = float(np.mean(np.asarray(labels) == np.asarray(expected)))
    if agreement < floor:
        return f"its labels agree {agreement:.0%} with the bundle's, below {floor:.0%}"
    return ""
