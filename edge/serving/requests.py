"""Turn a prediction request body into a validated float32 batch, or say exactly what is wrong.

Accepted: ``application/json`` ``{"inputs": [...]}`` (one sample or a batch, nested lists of
numbers) and ``application/x-npy`` (a ``.npy`` array, no pickles). Every problem is a
:class:`BadRequest` with an HTTP status and a short reason code for the metrics.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import numpy as np
import orjson  # 5x faster than json on a 32x32x3 sample, which otherwise costs more than the model
from starlette.requests import ClientDisconnect, Request

from edge.errors import EdgeError

JSON_TYPE = "application/json"
NPY_TYPE = "application/x-npy"


class BadRequest(EdgeError):
    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status, self.reason = status, reason


def _from_json(body: bytes) -> np.ndarray:
    try:
        document = orjson.loads(body)
    except orjson.JSONDecodeError as error:  # also NaN / Infinity literals: not JSON
        raise BadRequest(400, "malformed_json", f"the body is not valid JSON ({error})") from error
    if not isinstance(document, dict) or "inputs" not in document:
        raise BadRequest(422, "no_inputs", 'the body must be a JSON object {"inputs": [...]}')
    try:
        inputs = np.asarray(document["inputs"])
    except ValueError as error:  # ragged nesting
        raise BadRequest(422, "ragged", f"inputs is not a rectangular array of numbers ({error})") from error
    if inputs.dtype == object or not (np.issubdtype(inputs.dtype, np.number) or inputs.dtype == bool):
        raise BadRequest(422, "not_numeric", "inputs must be nested lists of numbers")
    if inputs.dtype == bool:
        raise BadRequest(422, "not_numeric", "inputs must be numbers, not booleans")
    return inputs


def _npy_header(stream: io.BytesIO) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype from a .npy header, before anything is allocated for the data."""
    version = np.lib.format.read_magic(stream)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    shape, _, dtype = read_header(stream)
    return shape, dtype


def _from_npy(body: bytes) -> np.ndarray:
    stream = io.BytesIO(body)
    try:
        shape, dtype = _npy_header(stream)
        declared = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if declared > len(body):  # np.load would allocate the declared size first: a 100-byte body can ask for TBs
            raise BadRequest(400, "malformed_npy", f"the .npy header declares {list(shape)} {dtype} "
                                                   f"({declared} bytes) but the body has {len(body)} bytes")
        stream.seek(0)
        inputs = np.load(stream, allow_pickle=False)
    except (ValueError, OSError, EOFError, TypeError) as error:
        raise BadRequest(400, "malformed_npy", f"the body is not a .npy array without pickles ({error})") from error
    if not isinstance(inputs, np.ndarray) or not (np.issubdtype(inputs.dtype, np.integer)
                                                  or np.issubdtype(inputs.dtype, np.floating)):
        raise BadRequest(422, "not_numeric", f"the array's dtype {getattr(inputs, 'dtype', '?')} is not int or float")
    return inputs


def parse_batch(body: bytes, content_type: str, input_shape: list[int], max_batch: int) -> np.ndarray:
    """A float32 batch (N, *input_shape) from the body; one sample becomes a batch of one."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type == JSON_TYPE:
        inputs = _from_json(body)
    elif media_type == NPY_TYPE:
        inputs = _from_npy(body)
    else:
        raise BadRequest(415, "media_type", f"content type {media_type or 'missing'!r} is not accepted: "
                                            f"send {JSON_TYPE} or {NPY_TYPE}")
    if inputs.size == 0:
        raise BadRequest(422, "empty", "the batch is empty")
    shape = tuple(input_shape)
    if inputs.shape == shape:
        inputs = inputs[np.newaxis]
    if inputs.ndim != len(shape) + 1 or inputs.shape[1:] != shape:
        raise BadRequest(422, "shape", f"inputs have shape {list(inputs.shape)}; the model takes {list(shape)} "
                                       f"(one sample) or [N, {', '.join(map(str, shape))}] (a batch)")
    if len(inputs) > max_batch:
        raise BadRequest(413, "batch_too_large", f"the batch has {len(inputs)} samples; at most {max_batch}")
    with np.errstate(over="ignore"):
        batch = inputs.astype(np.float32)
    if not np.all(np.isfinite(batch)):
        raise BadRequest(422, "not_finite", "inputs hold NaN or Inf (or values too large for float32)")
    return batch


async def body_chunks(request: Request, limit: int) -> AsyncIterator[bytes]:
    """The request body in chunks, refused with a 413 as soon as it is known to exceed ``limit``."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(413, "too_large", f"the body has {declared} bytes; at most {limit}")
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise BadRequest(413, "too_large", f"the body exceeds {limit} bytes")
            yield chunk
    except ClientDisconnect as error:  # nobody is left to answer; say so in the log, not as a 500
        raise BadRequest(400, "client_disconnected", "the client went away before sending the whole body") from error


async def read_body(request: Request, limit: int) -> bytes:
    """The whole request body, at most ``limit`` bytes (:func:`body_chunks`)."""
    return b"".join([chunk async for chunk in body_chunks(request, limit)])
