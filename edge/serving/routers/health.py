"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edge.serving.dependencies import ServicesDep
from edge.serving.responses import ErrorBody, error_response

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(services: ServicesDep) -> Any:
    """A verified, health-checked model is loaded."""
    active = services.engine.active
    if active is None:
        return error_response(503, "not_ready", "no verified model version is loaded")
    return {"status": "ready", "version": active.version}


@router.get("/metrics", response_class=Response)
async def metrics(services: ServicesDep) -> Response:
    """Prometheus metrics."""
    services.thermal.refresh()
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)
