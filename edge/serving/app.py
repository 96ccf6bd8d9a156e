"""The edge inference service: FastAPI routes over the engine, the sampler and the model store.

Predictions are answered from local state only (local-first): sampling writes to the local sample
store and uploads happen on a background thread. Every error a client can cause is a JSON 4xx;
no stack trace ever reaches a client.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from edge.config import ServeConfig
from edge.errors import BundleRefused, EdgeError, StoreError
from edge.serving.engine import ModelUnavailable, Prediction
from edge.serving.requests import JSON_TYPE, NPY_TYPE, BadRequest, body_chunks, parse_batch, read_body
from edge.serving.server import Services

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    error: str
    detail: str


class ScoredSample(BaseModel):
    label: str
    class_index: int
    confidence: float
    scores: list[float]
    stage: str  # primary | large (the cascade's second stage)


class PredictResponse(BaseModel):
    version: str
    model_name: str
    variant: str
    fallback: str | None
    latency_ms: float
    predictions: list[ScoredSample]


class ModelStatus(BaseModel):
    active: str | None
    serving: str | None
    previous: str | None
    installed: list[str]
    rolled_back: dict[str, str]
    manifest: dict[str, Any] | None


def _error(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


def _prediction_body(prediction: Prediction) -> dict[str, Any]:
    """The ``PredictResponse`` document of a prediction."""
    manifest = prediction.version.manifest
    labels = manifest.labels
    rows = [{"label": labels[index] if index < len(labels) else str(index), "class_index": int(index),
             "confidence": float(confidence), "scores": scores.tolist(), "stage": stage}
            for index, confidence, scores, stage in zip(prediction.class_indices, prediction.confidences,
                                                         prediction.scores, prediction.stages)]
    return {"version": manifest.version, "model_name": manifest.model_name, "variant": manifest.variant,
            "fallback": prediction.fallback, "latency_ms": prediction.latency_s * 1000.0, "predictions": rows}


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    JSON_TYPE: {"schema": {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
        "inputs": {"type": "array", "description": "one sample (the model's input shape) or a batch of them, "
                                                   "as nested lists of floats"}}}},
    NPY_TYPE: {"schema": {"type": "string", "format": "binary", "description": "a .npy float array"}}}}}
ERRORS = {status: {"model": ErrorBody} for status in (400, 401, 413, 415, 422, 503)}


def create_app(config: ServeConfig) -> FastAPI:
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

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        services.metrics.rejected.labels(error.reason).inc()
        return _error(error.status, error.reason, str(error))

    @app.exception_handler(StoreError)
    async def store_problem(request: Request, error: StoreError) -> JSONResponse:
        return _error(503, "store_error", str(error))

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        services.metrics.rejected.labels("validation").inc()
        return _error(422, "validation", "; ".join(str(item.get("msg")) for item in error.errors()[:5]))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return _error(500, "internal", f"{type(error).__name__}: the server logged the details")

    def admin(request: Request) -> None:
        token = services.admin_token
        given = request.headers.get("authorization", "")
        if token is None:
            raise BadRequest(401, "unauthorized", "admin endpoints are disabled: no admin token is configured")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            raise BadRequest(401, "unauthorized", "missing or wrong bearer token")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"model": ErrorBody}})
    async def readyz() -> Any:
        """A verified, health-checked model is loaded."""
        active = services.engine.active
        if active is None:
            return _error(503, "not_ready", "no verified model version is loaded")
        return {"status": "ready", "version": active.version}

    @app.get("/metrics", response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics."""
        services.thermal.refresh()
        return Response(generate_latest(services.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY)
    async def predict(request: Request) -> Any:
        """Scores, label and confidence for one sample or a batch (float inputs; quantization is applied here).

        Returns a ready JSONResponse: the ``response_model`` documents the shape without re-validating it
        on every request (that costs more than the model on small inputs).
        """
        active = services.engine.active
        if active is None:
            services.metrics.unavailable.inc()
            return _error(503, "not_ready", "no verified model version is loaded: install a signed bundle")
        body = await read_body(request, config.max_request_bytes)
        batch = parse_batch(body, request.headers.get("content-type", ""), active.manifest.input_shape,
                            config.max_batch)
        try:
            prediction = services.engine.predict(batch)
        except ModelUnavailable as error:
            return _error(503, "model_unavailable", str(error))
        manifest = prediction.version.manifest
        try:
            services.sampling.offer(batch, prediction.scores, prediction.latency_s * 1000.0, manifest.version)
        except (EdgeError, OSError) as error:  # sampling must never cost a prediction
            log.warning("sampling failed: %s", error)
        return Response(orjson.dumps(_prediction_body(prediction)), media_type=JSON_TYPE)

    @app.get("/v1/model", response_model=ModelStatus)
    async def model() -> Any:
        """The active version and its manifest, the previous one, and every installed version."""
        state, active = services.store.state(), services.engine.active
        return {"active": state.active, "serving": active.version if active else None, "previous": state.previous,
                "installed": state.installed, "rolled_back": state.rolled_back,
                "manifest": active.manifest.model_dump(mode="json", by_alias=True) if active else None}

    @app.post("/v1/model/reload", dependencies=[Depends(admin)], responses=ERRORS)
    async def reload() -> dict[str, str | None]:
        """Load the store's active version now (a failing one is rolled back)."""
        return {"active": await asyncio.to_thread(services.engine.reload)}

    @app.post("/v1/model/rollback", dependencies=[Depends(admin)], responses={**ERRORS, 409: {"model": ErrorBody}})
    async def rollback() -> Any:
        """Switch back to the previous version."""
        try:
            await asyncio.to_thread(services.store.rollback, "requested through /v1/model/rollback")
        except StoreError as error:
            return _error(409, "no_previous", str(error))
        return {"active": await asyncio.to_thread(services.engine.reload)}

    @app.post("/v1/model/install", dependencies=[Depends(admin)], responses={**ERRORS, 409: {"model": ErrorBody}},
              openapi_extra={"requestBody": {"required": True, "content": {"application/octet-stream": {
                  "schema": {"type": "string", "format": "binary", "description": "a signed bundle (.tar.gz)"}}}}})
    async def install(request: Request) -> Any:
        """Install a signed bundle (verified, health-checked) and serve it."""
        # streamed to the store's own filesystem (not /tmp, often RAM): bundles can be large
        with tempfile.NamedTemporaryFile(dir=services.store.root, prefix=".upload-", suffix=".tar.gz") as handle:
            async for chunk in body_chunks(request, services.max_bundle_bytes):
                handle.write(chunk)
            handle.flush()
            try:
                manifest = await asyncio.to_thread(services.store.install, Path(handle.name))
            except BundleRefused as error:
                return _error(409 if error.reason == "version_conflict" else 422, error.reason, str(error))
        return {"installed": manifest.version, "active": await asyncio.to_thread(services.engine.reload)}

    return app
