"""JSON responses of the edge service: the body every 4xx/5xx carries and the handlers that write it.

Every error a client can cause is a JSON 4xx with a short reason code; no stack trace ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from edge.errors import StoreError
from edge.serving.requests import JSON_TYPE, BadRequest
from edge.serving.server import Services

log = logging.getLogger(__name__)
HTTP_REASONS = {404: "not_found", 405: "method_not_allowed"}
Handler = Callable[[Request, Exception], Awaitable[Response]]


def json_response(document: Any, status: int = 200) -> Response:
    """``document`` as JSON (orjson: the predict path's serialisation costs more than a small model otherwise)."""
    return Response(orjson.dumps(document), status_code=status, media_type=JSON_TYPE)


def error_response(status: int, reason: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    """An ``ErrorBody`` response (``components.schemas.ErrorBody`` of ``openapi.json``)."""
    response = json_response({"error": reason, "detail": detail}, status)
    response.headers.update(headers or {})
    return response


def error_handlers(services: Services) -> dict[Any, Handler]:
    """Answer every exception with an ``ErrorBody``, counting the ones a client caused."""

    async def bad_request(request: Request, error: Exception) -> Response:
        assert isinstance(error, BadRequest)
        services.metrics.rejected.labels(error.reason).inc()
        return error_response(error.status, error.reason, str(error))

    async def store_problem(request: Request, error: Exception) -> Response:
        return error_response(503, "store_error", str(error))

    async def http_error(request: Request, error: Exception) -> Response:  # no such route, or not that method
        assert isinstance(error, HTTPException)
        services.metrics.rejected.labels(HTTP_REASONS.get(error.status_code, "http")).inc()
        return error_response(error.status_code, HTTP_REASONS.get(error.status_code, "http"), error.detail,
                              dict(error.headers or {}))

    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", f"{type(error).__name__}: the server logged the details")

    return {BadRequest: bad_request, StoreError: store_problem, HTTPException: http_error, Exception: unexpected}
