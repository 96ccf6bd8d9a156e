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
from edge.engine import InferenceEngine, ModelUnavailable, Prediction
from edge.errors import BundleRefused, ConfigError, EdgeError, StoreError
from edge.requests import JSON_TYPE, NPY_TYPE, BadRequest, parse_batch
from edge.samples import Sampler, SampleStore
from edge.sampling_worker import SamplingWorker
from edge.signing import load_public_keys
from edge.store import ModelStore
from edge.telemetry import Metrics
from edge.thermal import STATES, ThermalMonitor
from edge.upload import FolderTarget, HttpTarget, Uploader

log = logging.getLogger(__name__)
MAX_BUNDLE_BYTES = 512 * 2**20


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


class Services:
    """Everything one server instance owns; built from the config, started and stopped by the app."""

    def __init__(self, config: ServeConfig) -> None:
        self.config, self.metrics = config, Metrics()
        self.admin_token = config.secret("admin_token")
        self.thermal = ThermalMonitor(config.thermal_sensor, config.thermal_limit_c, config.thermal_soft_margin_c,
                                      config.thermal_hard_margin_c)
        self.store = ModelStore(config.store, load_public_keys(config.public_keys), config.keep_versions,
                                MAX_BUNDLE_BYTES, on_event=self.metrics.store_event)
        self.engine = InferenceEngine(self.store, self.metrics, self.thermal, config.num_threads,
                                      config.cascade_threshold, config.shadow_version, config.shadow_fraction)
        self.samples = SampleStore(config.samples_dir, int(config.sample_budget_mb * 2**20), config.sample_file_records,
                                   config.sample_file_age_s, config.store_raw)
        self.sampler = Sampler(self.samples, config.device_id, config.sample_rate, config.confidence_floor)
        self.sampling = SamplingWorker(self.sampler)
        self.uploader = Uploader(self.samples, self._upload_target(), paused=lambda: not self.thermal.allows_uploads)
        self._export_gauges()

    def _upload_target(self) -> FolderTarget | HttpTarget:
        target = self.config.upload_to
        if target.startswith(("http://", "https://")):
            token = self.config.secret("upload_token")
            if token is None:
                raise ConfigError("upload_to is an HTTP URL but no upload_token (or upload_token_file) is set")
            return HttpTarget(target, self.config.device_id, token)
        return FolderTarget(Path(target))

    def _export_gauges(self) -> None:
        gauge, samples, uploader, thermal = self.metrics.gauge, self.samples, self.uploader, self.thermal
        gauge("edgeloop_ready", "1 when a verified model is loaded", lambda: self.engine.active is not None)
        gauge("edgeloop_sample_store_bytes", "bytes the sample store holds on disk", lambda: samples.bytes_used)
        gauge("edgeloop_sample_store_dropped_files", "sample files deleted to stay in budget",
              lambda: samples.dropped_files)
        gauge("edgeloop_sample_store_dropped_records", "sampled records deleted to stay in budget",
              lambda: samples.dropped_records)
        gauge("edgeloop_samples_kept_by_rate", "predictions sampled at random", lambda: self.sampler.kept_by_rate)
        gauge("edgeloop_samples_kept_low_confidence", "predictions kept for low confidence",
              lambda: self.sampler.kept_low_confidence)
        gauge("edgeloop_samples_dropped_busy", "selected predictions not kept: the sampling worker was behind",
              lambda: self.sampling.dropped)
        gauge("edgeloop_upload_backlog_files", "closed sample files waiting for upload", lambda: uploader.backlog_files)
        gauge("edgeloop_upload_backlog_bytes", "bytes waiting for upload", lambda: uploader.backlog_bytes)
        gauge("edgeloop_uploaded_files", "sample files uploaded and confirmed", lambda: uploader.uploaded_files)
        gauge("edgeloop_upload_failures", "failed upload attempts", lambda: uploader.failed_attempts)
        gauge("edgeloop_temperature_celsius", "SoC temperature (NaN: no sensor)", lambda: thermal.temperature_c)
        gauge("edgeloop_thermal_state", "0 normal, 1 soft limit, 2 hard limit", lambda: STATES.index(thermal.state))

    async def watch(self) -> None:
        """Reload when ``state.json`` changes (an installer or updater switched versions); rotate samples."""
        seen = None
        while True:
            try:
                stat = self.store.state_file.stat()
                signature = (stat.st_mtime_ns, stat.st_ino)
            except FileNotFoundError:
                signature = None
            if signature != seen:
                seen = signature
                await asyncio.to_thread(self.engine.reload)
            self.thermal.refresh()
            await asyncio.to_thread(self.samples.maybe_rotate)
            await asyncio.sleep(self.config.watch_interval_s)


def _error(status: int, reason: str, detail: str) -> JSONResponse:
    return JSONResponse({"error": reason, "detail": detail}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "too_large", f"the body has {declared} bytes; at most {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BadRequest(413, "too_large", f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


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
        await asyncio.to_thread(services.engine.reload)
        services.uploader.start()
        services.sampling.start()
        watcher = asyncio.create_task(services.watch())
        try:
            yield
        finally:
            watcher.cancel()
            services.sampling.stop(timeout=5.0)
            services.uploader.stop(timeout=5.0)
            services.samples.close_segment()
            services.engine.close()

    app = FastAPI(title="edgeloop edge inference service", version="1", lifespan=lifespan,
                  description="Local-first predictions from the device's signed model store.")
    app.state.services = services

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, error: BadRequest) -> JSONResponse:
        services.metrics.rejected.labels(error.reason).inc()
        return _error(error.status, error.reason, str(error))

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
        body = await _read_body(request, config.max_request_bytes)
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
        body = await _read_body(request, MAX_BUNDLE_BYTES)
        with tempfile.NamedTemporaryFile(suffix=".tar.gz") as handle:
            handle.write(body)
            handle.flush()
            try:
                manifest = await asyncio.to_thread(services.store.install, Path(handle.name))
            except BundleRefused as error:
                return _error(409 if error.reason == "version_conflict" else 422, error.reason, str(error))
        return {"installed": manifest.version, "active": await asyncio.to_thread(services.engine.reload)}

    return app
