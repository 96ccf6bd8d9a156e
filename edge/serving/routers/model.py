"""The model store over HTTP: the active version, and the admin routes that reload, roll back and install."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import BundleRefused, StoreError
from edge.serving.dependencies import require_admin, services_of
from edge.serving.requests import body_chunks
from edge.serving.responses import error_response, json_response


async def model(request: Request) -> Response:
    """The active version and its manifest, the previous one, and every installed version (``ModelStatus``)."""
    services = services_of(request)
    state, active = services.store.state(), services.engine.active
    options = active.manifest.runtime_options if active else None
    return json_response({
        "active": state.active, "serving": active.version if active else None,
        "variant": active.manifest.variant if active else None,  # its class's, in a per-class release
        "runtime": active.primary.runtime if active else None,  # tflite (LiteRT) or onnx (ONNX Runtime)
        "config": options.config if options else "default",  # the configuration its bundle asks for
        "accelerators": active.primary.accelerators if active else [],  # XNNPACK, an ORT provider, or none
        "previous": state.previous, "installed": state.installed, "rolled_back": state.rolled_back,
        "manifest": active.manifest.to_dict() if active else None})


async def reload(request: Request) -> Response:
    """Load the store's active version now (a failing one is rolled back)."""
    services = require_admin(request)
    return json_response({"active": await asyncio.to_thread(services.engine.reload)})


async def rollback(request: Request) -> Response:
    """Switch back to the previous version."""
    services = require_admin(request)
    try:
        await asyncio.to_thread(services.store.rollback, "requested through /v1/model/rollback")
    except StoreError as error:
        return error_response(409, "no_previous", str(error))
    return json_response({"active": await asyncio.to_thread(services.engine.reload)})


async def install(request: Request) -> Response:
    """Install a signed bundle (verified, health-checked) and serve it."""
    services = require_admin(request)
    # streamed to the store's own filesystem (not /tmp, often RAM): bundles can be large
    with tempfile.NamedTemporaryFile(dir=services.store.root, prefix=".upload-", suffix=".tar.gz") as handle:
        async for chunk in body_chunks(request, services.max_bundle_bytes):
            handle.write(chunk)
        handle.flush()
        try:
            manifest = await asyncio.to_thread(services.store.install, Path(handle.name))
        except BundleRefused as error:
            return error_response(409 if error.reason == "version_conflict" else 422, error.reason, str(error))
    return json_response({"installed": manifest.version, "active": await asyncio.to_thread(services.engine.reload)})


ROUTES = [Route("/v1/model", model, methods=["GET"]), Route("/v1/model/reload", reload, methods=["POST"]),
          Route("/v1/model/rollback", rollback, methods=["POST"]),
          Route("/v1/model/install", install, methods=["POST"])]
