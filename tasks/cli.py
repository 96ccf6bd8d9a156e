"""Shared entry-point plumbing for the stage CLIs: explicit setup, clear errors, exit codes."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tasks.config import ConfigError, Params, load_params

EXIT_USER_ERROR = 2


class StageError(RuntimeError):
    """A stage that cannot finish for a reason the user can act on (the message says how)."""


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions whose message is meant for the user: printed plainly, no traceback."""
    from edge.runtime import InferenceError, ModelLoadError
    from edge.sidecar import SidecarError
    from tasks.data import DataError

    errors: list[type[BaseException]] = [ConfigError, StageError, DataError, ModelLoadError, InferenceError,
                                         SidecarError]
    if "tasks.zoo" in sys.modules:
        errors.append(sys.modules["tasks.zoo"].ModelZooError)
    return tuple(errors)


def read_stage_output(path: Path, stage: str) -> Any:
    """The JSON a stage wrote at ``path``; a clear error naming the stage to run when it is missing."""
    if not path.is_file():
        raise StageError(f"{path} not found; run the {stage} stage first (dvc repro {stage})")
    return json.loads(path.read_text())


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def run_stage(params_path: str | Path, stage: Callable[[Params], None]) -> int:
    """Load params, run ``stage``, and turn user-facing errors into a message and exit code 2."""
    setup_logging()
    try:
        params = load_params(params_path)
        stage(params)
    except user_errors() as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
