"""The request deadline: every request gets an answer of ours before Serve's own timeout.

Serve's proxy ends a request that outlives ``http_options.request_timeout_s`` (or the
client's ``x-request-timeout-seconds`` header) with a bare-text 408. :class:`RequestDeadline`
ends it a little earlier inside the Gateway with 504 and the usual error body, cancelling
the handler (Serve passes the cancellation on to a ModelServer call in flight).
"""

from __future__ import annotations

import asyncio

from app.api.errors import error_response
from app.errors import RequestTimeout

# Serve's per-request timeout header (ray.serve._private.constants.SERVE_HTTP_REQUEST_TIMEOUT_S_HEADER).
TIMEOUT_HEADER = b"x-request-timeout-seconds"


def deadline_s(headers: list[tuple[bytes, bytes]], limit_s: float) -> float:
    """Seconds the Gateway gives a request: the client's ``x-request-timeout-seconds`` when it
    is a positive number under ``limit_s``, else ``limit_s``, less a margin (a tenth, at most
    one second) so that the Gateway's 504 reaches the proxy before the proxy's own timeout.
    A header of 0 or less turns Serve's timeout off; the Gateway keeps its own."""
    timeout = limit_s
    for key, value in headers:
        if key.lower() == TIMEOUT_HEADER:
            try:
                asked = float(value.decode("latin-1"))
            except ValueError:
                continue
            if 0 < asked < timeout:  # NaN compares false: ignored
                timeout = asked
    return timeout - min(1.0, timeout / 10)


class RequestDeadline:
    """ASGI middleware: a request still running after :func:`deadline_s` is cancelled and
    answered 504 ``request_timeout``; one whose response has begun is only cut off."""

    def __init__(self, app, limit_s: float):
        self.app = app
        self.limit_s = limit_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        timeout = deadline_s(scope.get("headers", []), self.limit_s)
        started = False

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            async with asyncio.timeout(timeout):
                await self.app(scope, receive, tracked_send)
        except TimeoutError:
            if started:
                return
            error = RequestTimeout(
                f"the request did not finish within {timeout:.3g} s; it was cancelled",
                details={"timeout_s": round(timeout, 3)},
            )
            await error_response(error)(scope, receive, send)
