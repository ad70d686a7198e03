"""An endpoint's spec: how it routes and records traffic, typed and versioned apart from the
runtime ``config``.

The runtime config (device, batching, the runtime's options) is part of the multiplexed model
id, so changing it reloads models; the spec is read on every request and changing it reloads
nothing. Each change of the spec counts up the endpoint's ``spec_version``. Today the spec
holds the prediction-log settings, the traffic plan (:mod:`app.traffic.spec`) and feature
enrichment (:mod:`app.features.enrichment`).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator

from app.features.enrichment import FeatureEnrichment
from app.predlog.records import OPTIONAL_FIELDS
from app.traffic.spec import TrafficSpec


class LoggingSpec(BaseModel):
    """Which predictions of the endpoint the prediction log records, and what of each."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Record this endpoint's predictions in the prediction log.")
    sample_rate: float = Field(
        1.0, ge=0.0, le=1.0, description="Share of requests recorded (1.0: every one; 0.1: one in ten, at random)."
    )
    fields: list[str] = Field(
        default_factory=lambda: list(OPTIONAL_FIELDS),
        description="Optional parts of a record to keep: any of "
        + ", ".join(OPTIONAL_FIELDS)
        + ". Leave out `inputs` for an endpoint whose inputs are sensitive. The request id, time, endpoint, "
        "variant, model, version and latency are always kept.",
    )
    probabilities: bool = Field(
        False, description="Log a classifier's class probabilities for every logged prediction, also when the "
        "request did not ask for them (the answer still carries them only when asked): what confidence-based "
        "performance estimation (CBPE, docs/monitoring.md) reads. Costs the probabilities' computation per request.",
    )
    retention_days: int | None = Field(
        None, ge=1, le=3650, description="Days the records are kept; unset = the platform's predlog.retention_days."
    )

    @field_validator("fields")
    @classmethod
    def _fields(cls, value: list[str]) -> list[str]:
        unknown = [f for f in value if f not in OPTIONAL_FIELDS]
        if unknown:
            raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}; choose from {', '.join(OPTIONAL_FIELDS)}")
        return list(dict.fromkeys(value))


class EndpointSpec(BaseModel):
    """How an endpoint routes and records traffic (``spec`` of POST/PUT /v1/endpoints)."""

    model_config = ConfigDict(extra="forbid")

    logging: LoggingSpec = Field(default_factory=LoggingSpec, description="What the prediction log records.")
    traffic: TrafficSpec | None = Field(
        None, description="The traffic plan (PUT /v1/endpoints/{name}/traffic); unset = the target serves every request."
    )
    features: FeatureEnrichment | None = Field(
        None, description="Feature enrichment: stored features of a feature service joined to each request by its "
        "entity keys before the model call (docs/features.md); unset = requests carry every feature.",
    )


DEFAULT_SPEC = EndpointSpec()
