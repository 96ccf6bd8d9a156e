"""The edge inference service: the FastAPI app that wires the routers to one server's :class:`Services`.

Predictions are answered from local state only (local-first): sampling writes to the local sample
store and uploads happen on a background thread. Every error a client can cause is a JSON 4xx;
no stack trace ever reaches a client. The routes live in :mod:`edge.serving.routers`, one module per concern.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from edge.config import ServeConfig
from edge.serving.responses import add_error_handlers
from edge.serving.routers import health, model, predict
from edge.serving.server import Services


def create_app(config: ServeConfig) -> FastAPI:
    """The app of one edge server: its background work runs for the app's lifespan."""
    services = Services(config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(services.start)
        watcher = asyncio.create_task(services.watch())
        try:
            yield
        finally:
            watcher.cancel()
            await asyncio.to_thread(services.stop)

    app = FastAPI(title="edgeloop edge inference service", version="1", lifespan=lifespan,
                  description="Local-first predictions from the device's signed model store.")
    app.state.services = services
    add_error_handlers(app, services)
    for router in (health.router, predict.router, model.router):
        app.include_router(router)
    return app
