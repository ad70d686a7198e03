"""What the serving path hands the prediction log: one :class:`PredictionRecord` per request,
as cheap to make as a tuple. Turning it into rows (one per instance, features by name, JSON
outputs) happens off the request path, in the PredictionLog actor (``app.predlog.layout``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The optional parts of a record an endpoint may choose to keep (spec.logging.fields).
OPTIONAL_FIELDS = ("inputs", "outputs", "caller", "client_request_id")


@dataclass(slots=True)
class PredictionRecord:
    request_id: str  # server-issued (app.predlog.ids)
    timestamp: float  # Unix seconds, when the request arrived
    endpoint: str
    variant: str  # the traffic variant that served it ("" when the endpoint has one leg)
    model: str
    model_version: str
    latency_ms: float  # the request's time in the Gateway, model call included
    # The request as the model took it: {"instances": [[...], ...]}, {"inputs": {col: [...]}},
    # or {"tensor": float32 matrix} (V2); None when the endpoint does not keep inputs.
    inputs: dict[str, Any] | None = None
    # Feature names of the model version, to name the columns of "instances" / "tensor".
    feature_names: list[str] | None = None
    # The model's answer: {"predictions": [...], "probabilities": [[...], ...]?}; None = not kept.
    outputs: dict[str, Any] | None = None
    caller: str | None = None  # the principal's name
    client_request_id: str | None = None  # the client's own X-Request-Id (or V2 "id"), kept beside ours
    protocol: str = "rest"  # rest | v2 | grpc
    status: int = 200  # the HTTP status of the answer; a failed request is logged without outputs
    # An enriching endpoint's stored features, per row: {"values": {feature: value}, "stale"?: [...],
    # "missing"?: [...]} (app.features.enrichment); None when the endpoint does not enrich.
    features: list[dict[str, Any]] | None = None
