"""``POST /v1/predict``: answered from local state only (local-first).

Sampling hands the batch to a background worker that writes the local sample store; uploads run on a
thread of their own, so neither costs a prediction. The response is ``PredictResponse`` of ``openapi.json``.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from edge.errors import EdgeError
from edge.serving.dependencies import services_of
from edge.serving.engine import ModelUnavailable, Prediction
from edge.serving.requests import parse_batch, read_body
from edge.serving.responses import error_response, json_response

log = logging.getLogger(__name__)


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


async def predict(request: Request) -> Response:
    """Scores, label and confidence for one sample or a batch (float inputs; quantization is applied here)."""
    services = services_of(request)
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
    return json_response(_prediction_body(prediction))


ROUTES = [Route("/v1/predict", predict, methods=["POST"])]
