"""The flows ``bench/control_plane.py`` runs many of at once: shaped like a drift check and a training run.

Each writes to the Prefect API what the real ones write (task runs with their states, artifacts) without the
data or MLflow, so the figure is the control plane's, not the model's.
"""

from __future__ import annotations

import time

import numpy as np
from prefect import flow, task
from prefect.artifacts import create_markdown_artifact


@task
def feature_statistic(seed: int) -> float:
    rows = np.random.default_rng(seed).normal(size=(2_000, 16))
    return float(np.abs(rows.mean(axis=0)).max())


@flow(name="bench-drift-like")
def drift_like(tasks: int = 20) -> float:
    """A drift check: one task per feature window, then a summary artifact."""
    futures = [feature_statistic.submit(seed) for seed in range(tasks)]
    worst = max(future.result() for future in futures)
    create_markdown_artifact(f"worst feature shift {worst:.4f} over {tasks} windows", key="bench-drift")
    return worst


@task
def epoch(number: int, seconds: float) -> float:
    time.sleep(seconds)  # the model's time: the control plane only sees the task's states
    return 1.0 / (number + 1)


@flow(name="bench-training-like")
def training_like(epochs: int = 4, seconds: float = 2.0) -> float:
    """A training run: sequential epochs, then a summary artifact."""
    loss = 0.0
    for number in range(epochs):
        loss = epoch(number, seconds)
    create_markdown_artifact(f"final loss {loss:.3f} after {epochs} epochs", key="bench-training")
    return loss
