"""Request and response bodies of the HTTP API, and the training job spec.

Every field is documented here, where it is declared; the OpenAPI schema at /docs is built
from these models.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.names import NAME_PATTERN, check_name  # noqa: F401  (re-exported)
from app.serving.endpoint_spec import EndpointSpec


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_runtime(value: str) -> str:
    from app.runtimes.base import RUNTIMES

    if value not in RUNTIMES:
        raise ValueError(f"runtime {value!r} is unknown; available: {', '.join(sorted(RUNTIMES))}")
    return value


# -- training -------------------------------------------------------------------------------
class ResourceSpec(_Strict):
    """CPUs and GPUs of a one-process job (batch prediction)."""

    num_cpus: float | None = Field(None, gt=0, description="CPUs for the job; default: settings.jobs.num_cpus.")
    num_gpus: float = Field(0, ge=0, description="GPUs for the job (fractions allowed).")


class JobAccepted(BaseModel):
    job_id: str
    status: str


class JobView(BaseModel):
    job_id: str
    kind: str
    name: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    priority: int
    spec: dict[str, Any]
    result: dict[str, Any]
    progress: dict[str, Any]
    error: str | None
    attempts: int
    ray_job_id: str | None = None
    created_by: str
    created_at: str | None
    started_at: str | None
    finished_at: str | None
    logs: str | None = None


class Page(BaseModel):
    items: list[dict[str, Any]]
    next_page_token: str | None = None


# -- endpoints and prediction ---------------------------------------------------------------
class EndpointCreate(_Strict):
    name: str = Field(..., description="Endpoint name, used in /v1/endpoints/{name}/predict.", examples=["iris"])
    target: str = Field(
        ...,
        description="What the endpoint serves: 'model@alias', 'model/version', or models:/ forms of either.",
        examples=["iris@champion"],
    )
    runtime: str = Field("onnx", description="Inference runtime: a name in app.runtimes.base.RUNTIMES.")
    config: dict[str, Any] = Field(
        default_factory=dict,
        description="device and max_rows (every endpoint) and the runtime's typed options (see docs/api.md), "
        "checked now; kept with the endpoint.",
    )
    spec: EndpointSpec = Field(
        default_factory=EndpointSpec,
        description="How the endpoint routes and records traffic (prediction-log sampling, fields, retention); "
        "versioned apart from `config`: changing it reloads no model.",
    )

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str) -> str:
        return check_runtime(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "endpoint name")


class EndpointUpdate(_Strict):
    target: str | None = Field(None, description="New target; the next request uses it, nothing redeploys.")
    runtime: str | None = Field(None, description="New runtime (a name in app.runtimes.base.RUNTIMES).")
    config: dict[str, Any] | None = None
    spec: EndpointSpec | None = Field(
        None, description="New spec, replacing the whole spec (its spec_version counts up); reloads no model."
    )

    @field_validator("runtime")
    @classmethod
    def _runtime(cls, v: str | None) -> str | None:
        return None if v is None else check_runtime(v)


class PredictRequest(BaseModel):
    # One field beyond these may be sent: the sticky key of the endpoint's traffic plan
    # (``traffic.sticky.key``, e.g. customer_id), whose value picks the variant; the route refuses
    # any other field (as unknown) once the plan is known.
    model_config = ConfigDict(extra="allow")

    instances: list[Any] | None = Field(
        None,
        description="Rows: lists of feature values in model order, or objects keyed by feature name.",
        examples=[[[5.1, 3.5, 1.4, 0.2]]],
    )
    inputs: dict[str, list[Any]] | None = Field(
        None, description="Columns: feature name -> values (all of one length)."
    )
    return_probabilities: bool = Field(False, description="Add class probabilities for classifiers.")
    explain: Literal["members"] | None = Field(
        None, description="`members`: an ensemble's answer also lists each member's output, weight and latency "
        "(as `?explain=members`)."
    )

    @model_validator(mode="after")
    def _one_sticky_key(self) -> PredictRequest:
        extra = self.model_extra or {}
        if len(extra) > 1:
            raise ValueError(f"unknown fields {', '.join(map(repr, sorted(extra)))}; a request may add one field: "
                             "the sticky key of the endpoint's traffic plan")
        for key, value in extra.items():
            if not isinstance(value, (str, int)) or isinstance(value, bool) or len(str(value)) > 256:
                raise ValueError(f"{key!r}: a sticky key's value is a string or an integer of at most 256 characters")
        return self

    def sticky_value(self, key: str) -> str | None:
        """The value of the body field ``key`` (the plan's sticky key), as text; None when absent."""
        value = (self.model_extra or {}).get(key)
        return None if value is None else str(value)

    def unknown_fields(self, sticky_key: str | None) -> list[str]:
        """The extra fields that are not ``sticky_key``."""
        return [k for k in (self.model_extra or {}) if k != sticky_key]


class PredictResponse(BaseModel):
    predictions: list[Any]
    probabilities: list[list[float]] | None = None
    model: str
    model_version: str
    endpoint: str
    variant: str | None = Field(None, description="The traffic variant that served the request (None: one leg).")
    request_id: str = Field(..., description="Issued by the server (also the X-Request-Id header); feedback names it.")
    client_request_id: str | None = Field(None, description="The client's own X-Request-Id, when it sent one.")
    degraded: bool | None = Field(
        None, description="An ensemble answered from a quorum of its members (policy.min_members), not all: "
        "`failed` names the members that did not answer and why."
    )
    failed: list[dict[str, Any]] | None = Field(None, description="An ensemble's members that did not answer.")
    features: dict[str, list[str]] | None = Field(
        None, description="Only from an endpoint with spec.features: {stale: [...], missing: [...]}, the stored "
        "features (over all rows) that were older than max_age_s or absent, handled by on_missing."
    )
    members: list[dict[str, Any]] | None = Field(
        None, description="With explain=members: each member's {model, weight, output, latency_ms, error?}."
    )


_MAX_TOKEN_TTL_S = 10 * 365 * 24 * 3600


class TokenCreate(_Strict):
    name: str = Field(..., description="Who or what the token is for.")
    role: Literal["viewer", "predictor", "developer", "admin"]
    expires_at: datetime | None = Field(
        None, description="When the token stops working (ISO 8601; without a zone: UTC). Omit both this and "
        "ttl_s for a token that works until revoked.",
    )
    ttl_s: float | None = Field(
        None, gt=0, le=_MAX_TOKEN_TTL_S, description="Seconds from now until the token stops working "
        "(instead of expires_at; at most 10 years).",
    )

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "token name")

    @field_validator("expires_at")
    @classmethod
    def _future(cls, v: datetime | None) -> datetime | None:
        if v is None:
            return None
        try:
            v = (v if v.tzinfo is not None else v.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)
        except OverflowError:
            raise ValueError("expires_at is out of range") from None
        if v <= datetime.now(timezone.utc):
            raise ValueError("expires_at is not in the future")
        return v

    @model_validator(mode="after")
    def _one_expiry(self) -> "TokenCreate":
        if self.expires_at is not None and self.ttl_s is not None:
            raise ValueError("give expires_at or ttl_s, not both")
        return self

    def expiry(self) -> datetime | None:
        """The moment the token stops working, or None."""
        if self.ttl_s is not None:
            return datetime.now(timezone.utc) + timedelta(seconds=self.ttl_s)
        return self.expires_at


# The training job spec lives with the training code; importable from here as before.
from app.training.spec import TrainingJobSpec  # noqa: E402
