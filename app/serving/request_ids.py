"""Server-issued request ids at the HTTP ingress.

Every request gets an id the server makes (:func:`app.predlog.ids.new_request_id`, time-ordered
so that it names the prediction log's hour partition); a client's own ``X-Request-Id`` is kept
beside it as the client request id. Ray Serve's ingress (its proxy, or the Gateway replica's
own HTTP server in HAProxy mode) echoes the request's ``x-request-id`` header in the response
and in its logs, so the id is set there, before Serve reads it: :class:`ServerRequestIds` is an
ASGI middleware Serve wraps around its own (``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH``
names :func:`serve_middlewares`; ``app.serving.ingress.cluster_env`` sets it). It replaces
``x-request-id`` with the server's id and passes the client's on as
``x-matih-client-request-id``; ``x-matih-request-id`` tells the application the id is the
server's. Where the middleware is not installed (an in-process app in tests, an operator's own
proxy callback), the application issues the id itself and sets the response header.
"""

from __future__ import annotations

from typing import Any

from app.predlog.ids import is_request_id, new_request_id

REQUEST_ID = b"x-request-id"
SERVER_ID = b"x-matih-request-id"  # set only by the middleware: the id is the server's
CLIENT_ID = b"x-matih-client-request-id"
_OURS = (REQUEST_ID, SERVER_ID, CLIENT_ID)
MAX_CLIENT_ID_CHARS = 128


class ServerRequestIds:
    """ASGI middleware: see the module docstring."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = scope.get("headers") or []
        client = None
        kept = []
        for key, value in headers:
            low = key.lower()
            if low == REQUEST_ID:
                client = value[:MAX_CLIENT_ID_CHARS]
            if low not in _OURS:
                kept.append((key, value))
        rid = new_request_id().encode()
        kept.append((REQUEST_ID, rid))
        kept.append((SERVER_ID, rid))
        if client:
            kept.append((CLIENT_ID, client))
        scope = dict(scope)
        scope["headers"] = kept
        return await self.app(scope, receive, send)


def serve_middlewares() -> list:
    """The middlewares Serve's HTTP ingress adds (the proxy callback's import path names this)."""
    from starlette.middleware import Middleware

    return [Middleware(ServerRequestIds)]


def ids_of(headers) -> tuple[str, str | None, bool]:
    """``(server request id, client request id, issued_here)`` of a request's headers.
    ``issued_here`` is True when the middleware did not run and the id was made now (the
    response must then carry the ``X-Request-Id`` header itself)."""
    rid = headers.get("x-matih-request-id")
    if rid is not None and is_request_id(rid):
        return rid, headers.get("x-matih-client-request-id"), False
    client = headers.get("x-request-id")
    return new_request_id(), client[:MAX_CLIENT_ID_CHARS] if client else None, True
