"""``POST /v1/predict``: answered from local state only (local-first).

Sampling hands the batch to a background worker that writes the local sample store; uploads run on a
thread of their own, so neither costs a prediction.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel

from edge.errors import EdgeError
from edge.serving.dependencies import ServicesDep
from edge.serving.engine import ModelUnavailable, Prediction
from edge.serving.requests import JSON_TYPE, NPY_TYPE, parse_batch, read_body
from edge.serving.responses import ERRORS, error_response

log = logging.getLogger(__name__)
router = APIRouter()


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


PREDICT_BODY = {"requestBody": {"required": True, "content": {
    JSON_TYPE: {"schema": {"type": "object", "required": ["inputs"], "additionalProperties": False, "properties": {
        "inputs": {"type": "array", "description": "one sample (the model's input shape) or a batch of them, "
                                                   "as nested lists of floats"}}}},
    NPY_TYPE: {"schema": {"type": "string", "format": "binary", "description": "a .npy float array"}}}}}


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


@router.post("/v1/predict", response_model=PredictResponse, responses=ERRORS, openapi_extra=PREDICT_BODY)
async def predict(request: Request, services: ServicesDep) -> Any:
    """Scores, label and confidence for one sample or a batch (float inputs; quantization is applied here).

    Returns a ready JSONResponse: the ``response_model`` documents the shape without re-validating it
    on every request (that costs more than the model on small inputs).
    """
    active, config = services.engine.active, services.config
    if active is None:
        services.metrics.unavailable.inc()
        return error_response(503, "not_ready", "no verified model version is loaded: install a signed bundle")
    body = await read_body(request, config.max_request_bytes)
    batch = parse_batch(body, request.headers.get("content-type", ""), active.manifest.input_shape,
                        config.max_batch)
    try:
        prediction = services.engine.predict(batch)
    except ModelUnavailable as error:
        return error_response(503, "model_unavailable", str(error))
    manifest = prediction.version.manifest
    try:
        services.sampling.offer(batch, prediction.scores, prediction.latency_s * 1000.0, manifest.version)
    except (EdgeError, OSError) as error:  # sampling must never cost a prediction
        log.warning("sampling failed: %s", error)
    return Response(orjson.dumps(_prediction_body(prediction)), media_type=JSON_TYPE)
