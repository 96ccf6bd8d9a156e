"""The edge service's OpenAPI document: ``edge/serving/openapi.json``, its API's contract, served as written.

The service builds no schema at run time: FastAPI's import graph alone held ~9 MB of a 256 MB device's memory,
so the routes are plain Starlette and the document is kept by hand beside them. The tests keep the two honest:
every route the app serves is documented (and nothing else is), and a fuzzer checks the answers against it.

    python -m edge.serving.openapi     # the operations the document describes, one a line
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response

DOCUMENT_FILE = Path(__file__).with_name("openapi.json")


@cache
def document_bytes() -> bytes:
    return DOCUMENT_FILE.read_bytes()


def documented_operations() -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every operation the document describes."""
    paths = json.loads(document_bytes())["paths"]
    return {(method.upper(), path) for path, operations in paths.items() for method in operations}


async def openapi_document(request: Request) -> Response:
    return Response(document_bytes(), media_type="application/json")


if __name__ == "__main__":
    for method, path in sorted(documented_operations(), key=lambda operation: operation[::-1]):
        print(method, path)
