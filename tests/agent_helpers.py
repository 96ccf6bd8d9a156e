"""Helpers of the device agent's image-update test (tests/integration/test_package.py): images derived from the
packaged one, each broken in a way a real release can be, and traffic through the device's front that counts
every failed request."""

from __future__ import annotations

import io
import threading
from collections import Counter

import httpx
import numpy as np

# Dockerfile lines after FROM <the packaged image>, by what the derived image does.
DERIVED = {
    "good": ['LABEL io.edgeloop.test="a new build of the same service"'],
    "crash": ['ENTRYPOINT ["/opt/edgeloop/bin/python", "-c", "import sys; print(\'runtime missing\', flush=True); '
              'sys.exit(3)"]'],
    "hang": ['ENTRYPOINT ["/opt/edgeloop/bin/python", "-c", "import time; time.sleep(3600)"]'],
    # a serving bug: the service answers, but with the least likely class instead of the most likely one
    # (the image has no shell: the edit runs in its own Python, exec form)
    "wrong": ["USER root",
              'RUN ["/opt/edgeloop/bin/python", "-c", "import pathlib; '
              "path = pathlib.Path('/opt/edgeloop/app/edge/serving/engine.py'); text = path.read_text(); "
              "assert 'return self.scores.argmax(axis=1)' in text; "
              "path.write_text(text.replace('return self.scores.argmax(axis=1)', 'return self.scores.argmin(axis=1)'))"
              '"]',
              "USER edgeloop"],
}


def derived_image(client, registry: str, base: str, kind: str) -> str:
    """``base`` with ``DERIVED[kind]``, built, pushed to ``registry``; its reference pinned by digest."""
    from tasks.packaging.docker_client import push

    repository = f"{registry}/edgeloop/edge-derived"
    dockerfile = "\n".join([f"FROM {base}", *DERIVED[kind]]) + "\n"
    client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=f"{repository}:{kind}", rm=True, forcerm=True)
    return f"{repository}@{push(client, repository, kind)}"


class Traffic:
    """Predictions through ``url`` every ``interval_s`` in a thread, a connection each (a keep-alive connection
    follows its container until that one stops: see edge.agent.service); failures and served versions counted."""

    def __init__(self, url: str, sample: np.ndarray, interval_s: float = 0.05) -> None:
        self.url, self.inputs, self.interval_s = url, np.asarray(sample[:2], np.float32).tolist(), interval_s
        self.versions: Counter[str] = Counter()
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="traffic")

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with httpx.Client(timeout=30.0) as client:
                try:
                    response = client.post(f"{self.url}/v1/predict", json={"inputs": self.inputs})
                    if response.status_code == 200:
                        self.versions[response.json()["version"]] += 1
                    else:
                        self.failures.append(f"HTTP {response.status_code}: {response.text[:200]}")
                except httpx.HTTPError as error:
                    self.failures.append(f"{type(error).__name__}: {error}")
