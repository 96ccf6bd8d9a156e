"""What every command-line entry point shares: explicit setup, the two error bases, exit codes."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from edge.errors import EXIT_USER_ERROR, EdgeError
from tasks.config import PARAMS_FILE, Params, load_params
from tasks.contracts import Workspace
from tasks.errors import EdgeloopError

USER_ERRORS: tuple[type[BaseException], ...] = (EdgeloopError, EdgeError)


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def stage_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options every stage takes: ``--params`` and ``--workspace``."""
    parser.add_argument("--params", type=Path, default=PARAMS_FILE, help="parameter file (default: %(default)s)")
    parser.add_argument("--workspace", type=Path, default=Path("."),
                        help="root of every stage output (default: the current folder, as dvc repro uses)")
    return parser


def report_user_errors(action: Callable[[], None]) -> int:
    """Run ``action``; a user-facing error becomes its message on stderr and exit code 2."""
    try:
        action()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    return 0


def run_stage(args: argparse.Namespace, stage: Callable[[Params, Workspace], None]) -> int:
    """Load params, run ``stage`` in the workspace, and turn user-facing errors into exit code 2."""
    setup_logging()
    return report_user_errors(lambda: stage(load_params(args.params), Workspace(args.workspace)))
