"""The tables that map the error hierarchy to HTTP and to gRPC, and the handlers that use them.

Every error body is ``{"error": "<message>", "code": "<machine code>"}`` (plus ``details``
where there is more to say), for our own errors, FastAPI's validation errors, unknown routes
and unexpected failures alike.
"""

from __future__ import annotations

import logging

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from app import errors as E
from app.redaction import redact, redact_value

log = logging.getLogger(__name__)

# Most specific first: the first class in this table that the error is an instance of wins.
STATUS_BY_ERROR: list[tuple[type[E.MatihError], int]] = [
    (E.BadRequest, 400),
    (E.RegistryRejected, 422),
    (E.InvalidInput, 422),
    (E.Unauthenticated, 401),
    (E.PermissionDenied, 403),
    (E.RegistryForbidden, 403),
    (E.NotFound, 404),
    (E.Conflict, 409),
    (E.PayloadTooLarge, 413),
    (E.Overloaded, 429),
    (E.DependencyTimeout, 503),
    (E.DependencyUnavailable, 503),
    (E.RequestTimeout, 504),
    (E.ModelError, 500),
    (E.ConfigError, 500),
    (E.MatihError, 500),
]


# The same classes as gRPC status codes (the Open Inference Protocol over gRPC), by the
# mapping of google.rpc.Code to HTTP; timeouts are DEADLINE_EXCEEDED on both sides of it.
GRPC_STATUS_BY_ERROR: list[tuple[type[E.MatihError], grpc.StatusCode]] = [
    (E.BadRequest, grpc.StatusCode.INVALID_ARGUMENT),
    (E.RegistryRejected, grpc.StatusCode.INVALID_ARGUMENT),
    (E.InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (E.Unauthenticated, grpc.StatusCode.UNAUTHENTICATED),
    (E.PermissionDenied, grpc.StatusCode.PERMISSION_DENIED),
    (E.RegistryForbidden, grpc.StatusCode.PERMISSION_DENIED),
    (E.NotFound, grpc.StatusCode.NOT_FOUND),
    (E.Conflict, grpc.StatusCode.ABORTED),
    (E.PayloadTooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (E.DependencyTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.DependencyUnavailable, grpc.StatusCode.UNAVAILABLE),
    (E.RequestTimeout, grpc.StatusCode.DEADLINE_EXCEEDED),
    (E.ModelError, grpc.StatusCode.INTERNAL),
    (E.ConfigError, grpc.StatusCode.INTERNAL),
    (E.MatihError, grpc.StatusCode.INTERNAL),
]


def status_for(exc: E.MatihError) -> int:
    for cls, status in STATUS_BY_ERROR:
        if isinstance(exc, cls):
            return status
    return 500


def _original(exc: E.MatihError) -> E.MatihError:
    # Ray's RayTaskError+cause dual class answers class attributes (``code``) from the class,
    # not from the raised instance; the instance Ray wraps is in ``cause``.
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, E.MatihError) else exc


def grpc_status(exc: E.MatihError) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and details of an error: the details are the message of the HTTP
    body (redacted) with its machine code in front, e.g. ``not_found: model 'x' is ...``."""
    exc = _original(exc)
    code = next((c for cls, c in GRPC_STATUS_BY_ERROR if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)
    return code, f"{exc.code}: {redact(exc.message)}"


def error_response(exc: E.MatihError) -> JSONResponse:
    exc = _original(exc)
    status = status_for(exc)
    headers = {}
    if status in (429, 503):
        headers["Retry-After"] = str(int(exc.details.get("retry_after_s", 1)))
    if status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    # A RayTaskError subclass carries the original's attributes; rebuild a plain body.
    # Messages may quote a URI with its password (an MLflow or database URL): never shown.
    body = {"error": redact(exc.message), "code": exc.code}
    if exc.details:
        body["details"] = redact_value(exc.details)
    return JSONResponse(body, status_code=status, headers=headers)


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


_NOT_AN_OBJECT = {"model_attributes_type", "dict_type", "model_type"}


def validation_error(exc: RequestValidationError) -> E.MatihError:
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        return E.BadRequest("the request body is not valid JSON", details={"field": "body"})
    if any(tuple(e.get("loc", ())) == ("body",) and e.get("type") in _NOT_AN_OBJECT for e in errs):
        return E.BadRequest(
            "the request body must be a JSON object (send Content-Type: application/json)", details={"field": "body"}
        )
    first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
    problems = [f"{_field(tuple(e.get('loc', ())))}: {e.get('msg')}" for e in errs[:10]]
    return E.InvalidInput(
        "; ".join(problems), details={"field": _field(tuple(first.get("loc", ()))), "errors": len(errs)}
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(E.MatihError)
    async def _matih(_: Request, exc: E.MatihError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return error_response(validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404 and message == "Not Found":
            message = "no such route; see /docs for the API"
        return JSONResponse({"error": redact(message), "code": code}, status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return JSONResponse({"error": "internal error; see the gateway logs", "code": "internal_error"}, status_code=500)
