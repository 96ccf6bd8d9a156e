"""The model store over HTTP: the active version, and the admin routes that reload, roll back and install."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel

from edge.errors import BundleRefused, StoreError
from edge.serving.dependencies import ServicesDep, admin
from edge.serving.requests import body_chunks
from edge.serving.responses import CONFLICT, ERRORS, error_response

router = APIRouter()
BUNDLE_BODY = {"requestBody": {"required": True, "content": {"application/octet-stream": {
    "schema": {"type": "string", "format": "binary", "description": "a signed bundle (.tar.gz)"}}}}}


class ModelStatus(BaseModel):
    active: str | None
    serving: str | None
    variant: str | None = None   # the variant the serving version runs (its class's, in a per-class release)
    runtime: str | None = None   # the runtime that runs it here: tflite (LiteRT) or onnx (ONNX Runtime)
    config: str = "default"      # the runtime configuration its bundle asks for (the benchmark's best on the class)
    accelerators: list[str] = []  # what runs it besides the plain CPU kernels here: XNNPACK, an ORT provider
    previous: str | None
    installed: list[str]
    rolled_back: dict[str, str]
    manifest: dict[str, Any] | None


@router.get("/v1/model", response_model=ModelStatus)
async def model(services: ServicesDep) -> Any:
    """The active version and its manifest, the previous one, and every installed version."""
    state, active = services.store.state(), services.engine.active
    return {"active": state.active, "serving": active.version if active else None,
            "variant": active.manifest.variant if active else None,
            "runtime": active.primary.runtime if active else None,
            "config": active.manifest.runtime_options.config if active and active.manifest.runtime_options
            else "default", "accelerators": active.primary.accelerators if active else [],
            "previous": state.previous,
            "installed": state.installed, "rolled_back": state.rolled_back,
            "manifest": active.manifest.model_dump(mode="json", by_alias=True) if active else None}


@router.post("/v1/model/reload", dependencies=[Depends(admin)], responses=ERRORS)
async def reload(services: ServicesDep) -> dict[str, str | None]:
    """Load the store's active version now (a failing one is rolled back)."""
    return {"active": await asyncio.to_thread(services.engine.reload)}


@router.post("/v1/model/rollback", dependencies=[Depends(admin)], responses={**ERRORS, **CONFLICT})
async def rollback(services: ServicesDep) -> Any:
    """Switch back to the previous version."""
    try:
        await asyncio.to_thread(services.store.rollback, "requested through /v1/model/rollback")
    except StoreError as error:
        return error_response(409, "no_previous", str(error))
    return {"active": await asyncio.to_thread(services.engine.reload)}


@router.post("/v1/model/install", dependencies=[Depends(admin)], responses={**ERRORS, **CONFLICT},
             openapi_extra=BUNDLE_BODY)
async def install(request: Request, services: ServicesDep) -> Any:
    """Install a signed bundle (verified, health-checked) and serve it."""
    # streamed to the store's own filesystem (not /tmp, often RAM): bundles can be large
    with tempfile.NamedTemporaryFile(dir=services.store.root, prefix=".upload-", suffix=".tar.gz") as handle:
        async for chunk in body_chunks(request, services.max_bundle_bytes):
            handle.write(chunk)
        handle.flush()
        try:
            manifest = await asyncio.to_thread(services.store.install, Path(handle.name))
        except BundleRefused as error:
            return error_response(409 if error.reason == "version_conflict" else 422, error.reason, str(error))
    return {"installed": manifest.version, "active": await asyncio.to_thread(services.engine.reload)}
