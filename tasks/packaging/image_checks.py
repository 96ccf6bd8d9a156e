"""The gates an edge image passes before it is pushed, measured on the built image.

Size; cold start (``docker run`` to the first 200 from ``/readyz``) with a device profile's limits;
the container's predictions against the host runtime's for the bundle's sample; a non-root user.
Emulated (qemu) images are held to the labels only, and their timings are never gated.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from edge.store.health import LoadedVersion
from tasks.config import PackageParams
from tasks.errors import PackagingError
from tasks.packaging import docker_client as docker_engine
from tasks.packaging.docker_client import Engine

EXACT_ATOL = 1e-5             # amd64: the container's scores equal the host runtime's to this tolerance
EMULATED_MIN_AGREEMENT = 0.9  # arm64 under qemu: other kernels, so labels (not scores) must agree


class ImageRecord(BaseModel):
    """One built image: where it is, what it measured, whether it passed."""

    model_config = ConfigDict(extra="forbid")
    platform: str
    arch: str
    runtime: str
    reference: str                 # registry/repository:tag
    variant: str = ""              # the variant its bundle serves
    classes: list[str] = []        # the device classes this image is for (per-class releases)
    digest: str | None = None      # after the push
    status: Literal["pushed", "already_released", "failed_gate", "not_pushed", "not_built"] = "not_pushed"
    base_image: str = ""    # the builder stage's base
    runtime_base: str = ""  # the final stage's: what the image runs on
    image_mb: float | None = None
    ready_s: float | None = None   # docker run to the first 200 from /readyz: the fastest of the starts
    start_s: list[float] = []      # every measured start (a second one only when the first was over budget)
    emulated: bool = False         # run under qemu user emulation: timings are not device timings
    max_abs_score_diff: float | None = None
    label_agreement: float | None = None
    user: str | None = None        # the uid the service runs as
    failures: list[str] = []

    @property
    def pinned(self) -> str | None:
        return f"{self.reference.rsplit(':', 1)[0]}@{self.digest}" if self.digest else None


def host_outputs(loaded: LoadedVersion, sample: np.ndarray) -> dict[str, np.ndarray]:
    outputs = {"primary": loaded.primary.predict(sample)}
    if loaded.large is not None:
        outputs["large"] = loaded.large.predict(sample)
    return outputs


def compare_predictions(record: ImageRecord, answer: dict, host: dict[str, np.ndarray]) -> None:
    """Fill the record's prediction figures: the container's answer against the host runtime's outputs."""
    rows = answer["predictions"]
    scores = np.asarray([row["scores"] for row in rows], np.float32)
    expected = np.stack([host[row["stage"]][index] for index, row in enumerate(rows)])
    record.max_abs_score_diff = float(np.max(np.abs(scores - expected)))
    record.label_agreement = float(np.mean(scores.argmax(axis=1) == expected.argmax(axis=1)))


def _restart_while_over_budget(engine: Engine, record: ImageRecord, params: PackageParams, cpus: float | None,
                               memory_mb: int | None, timeout_s: float) -> None:
    """Start the image again, up to ``package.start_attempts`` starts in all, while none was within budget.

    A cold start on a busy host (a build, a browser, another container) is slower than the image is; the gate
    judges the image by its fastest start, and every start is recorded.
    """
    while min(record.start_s) > params.max_start_s and len(record.start_s) < params.start_attempts:
        with docker_engine.running(engine.client, record.reference, record.platform, cpus, memory_mb,
                                   timeout_s) as container:
            record.start_s.append(round(container.ready_s, 3))


def check_image(engine: Engine, record: ImageRecord, params: PackageParams, cpus: float | None,
                memory_mb: int | None, sample: np.ndarray, host: dict[str, np.ndarray]) -> None:
    """Measure ``record``'s image and apply the gates; failures go into ``record.failures``."""
    record.image_mb = round(docker_engine.image_mb(engine.client, record.reference), 1)
    if record.image_mb > params.max_image_mb:
        record.failures.append(f"image is {record.image_mb:.1f} MB, above package.max_image_mb {params.max_image_mb:g}")
    timeout_s = params.emulated_start_timeout_s if record.emulated else max(params.max_start_s * 6, 30.0)
    try:
        with docker_engine.running(engine.client, record.reference, record.platform, cpus, memory_mb,
                                   timeout_s, emulated=record.emulated) as container:
            record.start_s.append(round(container.ready_s, 3))
            record.user = container.exec(docker_engine.IMAGE_PYTHON, "-c", "import os; print(os.getuid())")
            compare_predictions(record, container.predict(sample), host)
        if not record.emulated:
            _restart_while_over_budget(engine, record, params, cpus, memory_mb, timeout_s)
    except PackagingError as error:
        record.ready_s = min(record.start_s, default=None)
        record.failures.append(str(error))
        return
    record.ready_s = min(record.start_s)
    if not record.emulated and record.ready_s > params.max_start_s:
        starts = ", ".join(f"{seconds:.2f}" for seconds in record.start_s)
        record.failures.append(f"cold start took {record.ready_s:.2f} s, above package.max_start_s "
                               f"{params.max_start_s:g} (fastest of {len(record.start_s)} starts: {starts} s)")
    if record.user == "0":
        record.failures.append("the service runs as root")
    if record.emulated:
        if record.label_agreement < EMULATED_MIN_AGREEMENT:
            record.failures.append(f"under emulation the container's labels agree {record.label_agreement:.0%} with "
                                   f"the host's, below {EMULATED_MIN_AGREEMENT:.0%}")
    elif record.label_agreement < 1.0 or record.max_abs_score_diff > EXACT_ATOL:
        record.failures.append(f"the container's predictions differ from the host runtime's (labels agree "
                               f"{record.label_agreement:.0%}, max score difference {record.max_abs_score_diff:.2g})")
    if record.failures:
        record.status = "failed_gate"
