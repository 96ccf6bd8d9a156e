"""Dependencies the routers share: the server's :class:`Services` and the admin bearer-token check.

Both are ``async``: FastAPI runs a plain ``def`` dependency on its thread pool, a hop per request on the hot path.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from edge.serving.requests import BadRequest
from edge.serving.server import Services


async def get_services(request: Request) -> Services:
    """The :class:`Services` of the app serving ``request`` (set by :func:`edge.serving.app.create_app`)."""
    return request.app.state.services


ServicesDep = Annotated[Services, Depends(get_services)]


async def admin(request: Request) -> None:
    """Refuse a request without the configured admin bearer token (and every request when none is configured)."""
    token = request.app.state.services.admin_token
    given = request.headers.get("authorization", "")
    if token is None:
        raise BadRequest(401, "unauthorized", "admin endpoints are disabled: no admin token is configured")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise BadRequest(401, "unauthorized", "missing or wrong bearer token")
