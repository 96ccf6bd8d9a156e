"""Formatting for :mod:`tasks.config`: parameters flattened for MLflow, validation errors one line per problem."""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten a nested dict to dotted keys with string values."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}."))
        else:
            flat[dotted] = json.dumps(value) if isinstance(value, list | bool) or value is None else str(value)
    return flat


def format_validation_error(error: ValidationError, source: str, names: dict[str, str] | None = None) -> str:
    """One line per problem: the dotted key (or its name in ``names``), the offending value and what is allowed."""
    lines = [f"invalid parameters in {source}:"]
    for problem in error.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        key = (names or {}).get(key, key)
        if problem["type"] == "extra_forbidden":
            lines.append(f"  - {key}: unknown key (check the spelling; allowed keys are listed in params.yaml)")
            continue
        value = problem.get("input")
        shown = "(missing)" if problem["type"] == "missing" else repr(value)
        message = problem["msg"].removeprefix("Value error, ")
        lines.append(f"  - {key}: got {shown}; {message}")
    return "\n".join(lines)
