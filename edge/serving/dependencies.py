"""What every route needs from its request: the server's :class:`Services`, and the admin bearer-token check."""

from __future__ import annotations

import hmac

from starlette.requests import Request

from edge.serving.requests import BadRequest
from edge.serving.server import Services


def services_of(request: Request) -> Services:
    """The :class:`Services` of the app serving ``request`` (set by :func:`edge.serving.app.create_app`)."""
    return request.app.state.services


def require_admin(request: Request) -> Services:
    """The request's :class:`Services`, or a 401 without the configured admin bearer token (and every time when
    none is configured)."""
    services = services_of(request)
    token, given = services.admin_token, request.headers.get("authorization", "")
    if token is None:
        raise BadRequest(401, "unauthorized", "admin endpoints are disabled: no admin token is configured")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise BadRequest(401, "unauthorized", "missing or wrong bearer token")
    return services
