"""Which failures a flow retries: only transient ones (no answer, timeouts, 5xx), never a bug or a refusal."""

from __future__ import annotations

from typing import Any

from tasks.errors import EdgeloopError, ServiceUnavailable
from tasks.registry.tracking import no_answer


def is_transient(error: BaseException) -> bool:
    """True for a server that did not answer or answered 5xx; False for everything retrying cannot fix."""
    if isinstance(error, ServiceUnavailable):
        return True
    if isinstance(error, EdgeloopError):  # bad input, a refused step, a gate: the same again next time
        return False
    return no_answer(error)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry the task only when it failed for a transient reason."""
    try:
        state.result()
    except Exception as error:  # the task's own exception, whatever its type, is what we classify
        return is_transient(error)
    return False
