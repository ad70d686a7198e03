"""The one error hierarchy of MATIH ML.

Errors know nothing about HTTP: each carries a machine ``code`` and a message that names the
bad value and the fix. The Gateway maps classes to status codes in one table
(``app.api.errors.STATUS_BY_ERROR``); actors, jobs and the CLI raise the same classes.
Every class is picklable, so an error raised in a Ray replica or actor reaches the caller as
an instance of the same class.
"""

from __future__ import annotations

from typing import Any


class MatihError(Exception):
    """Base class. ``code`` is stable and machine-readable; ``message`` is for people."""

    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details or {}

    def __reduce__(self):  # keep code and details across pickling (Ray, multiprocessing)
        return (_rebuild, (type(self), self.message, self.code, self.details))

    def to_body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"error": self.message, "code": self.code}
        if self.details:
            body["details"] = self.details
        return body


def _rebuild(cls: type[MatihError], message: str, code: str, details: dict[str, Any]) -> MatihError:
    return cls(message, code=code, details=details)


class ConfigError(MatihError):
    """The configuration cannot be used; raised at start-up, before anything is served."""

    code = "config_error"


class BadRequest(MatihError):
    """The request cannot be parsed (malformed JSON, wrong content type)."""

    code = "bad_request"


class InvalidInput(MatihError):
    """The request parses but its values are wrong (feature count, types, unknown estimator)."""

    code = "invalid_input"


class Unauthenticated(MatihError):
    """No token, or a token nobody issued."""

    code = "unauthenticated"


class PermissionDenied(MatihError):
    """A valid token whose role is below what the route needs."""

    code = "permission_denied"


class NotFound(MatihError):
    code = "not_found"


class Conflict(MatihError):
    """The object exists already, or the state change is not allowed from the current state."""

    code = "conflict"


class RegistryRejected(InvalidInput):
    """MLflow refused a registry request as invalid (its HTTP 400): a value MLflow does not
    accept. The message is MLflow's own."""

    code = "registry_rejected"


class RegistryForbidden(MatihError):
    """MLflow refused the platform's own identity (its HTTP 401 or 403): the MLflow user the
    platform runs as lacks the permission; an operator grants it. Not the caller's role."""

    code = "registry_permission_denied"


class PayloadTooLarge(MatihError):
    code = "payload_too_large"


class Overloaded(MatihError):
    """Too much work right now; try again after ``retry_after_s``."""

    code = "overloaded"

    def __init__(self, message: str, *, retry_after_s: int = 1, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.details.setdefault("retry_after_s", retry_after_s)


class DependencyUnavailable(MatihError):
    """A store or service the request needs is down (MLflow, the metadata store, Ray)."""

    code = "dependency_unavailable"

    def __init__(self, message: str, *, retry_after_s: int = 5, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.details.setdefault("retry_after_s", retry_after_s)


class DependencyTimeout(DependencyUnavailable):
    """A store, actor or task the request needs did not answer within its time limit."""

    code = "dependency_timeout"


class RequestTimeout(MatihError):
    """The request did not finish within its time limit (a model slower than the limit, say)."""

    code = "request_timeout"


class ModelError(MatihError):
    """A model failed while loading or predicting for reasons that are not the caller's input."""

    code = "model_error"


# The request's fault, not the service's (4xx). A Serve replica hands these back to its caller
# as return values instead of raising them, so that Serve does not log a bad payload as a
# replica failure with a traceback (see deployments/model_server.py and deployments/gateway.py).
CALLER_ERRORS: tuple[type[MatihError], ...] = (
    BadRequest, InvalidInput, Unauthenticated, PermissionDenied, NotFound, Conflict, PayloadTooLarge,
)
