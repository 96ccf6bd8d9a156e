"""JSON error responses of the edge service: the body every 4xx/5xx carries and the handlers that write it.

Every error a client can cause is a JSON 4xx with a short reason code; no stack trace ever reaches a client.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from edge.errors import StoreError
from edge.serving.requests import BadRequest
from edge.serving.server import Services

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str
    detail: str


# the errors any route that reads a body or needs the admin token can answer with (documented in OpenAPI)
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 413, 415, 422, 503)}
CONFLICT = {409: {"model": ErrorBody}}


def error_response(status: int, reason: str, detail: str) -> JSONResponse:
    """An :class:`ErrorBody` response."""
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


def add_error_handlers(app: FastAPI, services: Services) -> None:
    """Answer every exception with an :class:`ErrorBody`, counting the ones a client caused."""

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        services.metrics.rejected.labels(error.reason).inc()
        return error_response(error.status, error.reason, str(error))

    @app.exception_handler(StoreError)
    async def store_problem(request: Request, error: StoreError) -> JSONResponse:
        return error_response(503, "store_error", str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        services.metrics.rejected.labels("validation").inc()
        return error_response(422, "validation", "; ".join(str(item.get("msg")) for item in error.errors()[:5]))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(500, "internal", f"{type(error).__name__}: the server logged the details")
