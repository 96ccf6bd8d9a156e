"""The edge inference service: the Starlette app that wires the routes to one server's :class:`Services`.

Predictions are answered from local state only (local-first): sampling writes to the local sample
store and uploads happen on a background thread. Every error a client can cause is a JSON 4xx;
no stack trace ever reaches a client. The routes live in :mod:`edge.serving.routers`, one module per concern;
their contract is ``openapi.json`` (:mod:`edge.serving.openapi`), served at ``/openapi.json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import Route

from edge.config import ServeConfig
from edge.serving.openapi import openapi_document
from edge.serving.responses import error_handlers
from edge.serving.routers import health, model, predict
from edge.serving.server import Services


def create_app(config: ServeConfig) -> Starlette:
    """The app of one edge server: its background work runs for the app's lifespan."""
    services = Services(config)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await asyncio.to_thread(services.start)
        watcher = asyncio.create_task(services.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(services.stop)

    routes = [*health.ROUTES, *predict.ROUTES, *model.ROUTES,
              Route("/openapi.json", openapi_document, methods=["GET"], include_in_schema=False)]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers=error_handlers(services))
    app.state.services = services
    return app
