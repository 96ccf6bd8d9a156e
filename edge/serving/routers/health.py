"""Liveness, readiness and Prometheus metrics."""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.serving.dependencies import services_of
from edge.serving.responses import error_response, json_response


async def healthz(request: Request) -> Response:
    """The process is up."""
    return json_response({"status": "ok"})


async def readyz(request: Request) -> Response:
    """A verified, health-checked model is loaded."""
    active = services_of(request).engine.active
    if active is None:
        return error_response(503, "not_ready", "no verified model version is loaded")
    return json_response({"status": "ready", "version": active.version})


async def metrics(request: Request) -> Response:
    """Prometheus metrics."""
    services = services_of(request)
    services.thermal.refresh()
    return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)


ROUTES = [Route("/healthz", healthz, methods=["GET"]), Route("/readyz", readyz, methods=["GET"]),
          Route("/metrics", metrics, methods=["GET"])]
