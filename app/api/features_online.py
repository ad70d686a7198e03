"""Feature store routes: online reads (``POST /v1/features/online``), through the platform's read
path (:mod:`app.features.online`): the same reader that enriches predictions."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.errors import InvalidInput, NotFound
from app.features.online import reader_for


class OnlineRequest(BaseModel):
    """Body of POST /v1/features/online (as Feast's feature server's /get-online-features)."""

    model_config = ConfigDict(extra="forbid")

    features: list[str] | None = Field(None, description="Feature references 'view:feature' (or give feature_service).")
    feature_service: str | None = Field(None, description="A feature service whose features are read.")
    entities: dict[str, list[Any]] = Field(
        ..., description="Join key -> values, one per entity row (all of one length).",
        examples=[{"customer_id": [1001, 1002]}],
    )
    full_feature_names: bool = Field(False, description="Name results 'view__feature' instead of 'feature'.")

    @model_validator(mode="after")
    def _one_of(self) -> "OnlineRequest":
        if (self.features is None) == (self.feature_service is None):
            raise ValueError("send exactly one of 'features' (['view:feature', ...]) or 'feature_service'")
        return self


class OnlineResponse(BaseModel):
    features: list[str] = Field(..., description="The feature names of `results`, in order (join keys not included).")
    results: dict[str, list[Any]] = Field(
        ..., description="Join keys and features -> one value per entity row (null: nothing stored for the row)."
    )
    event_timestamps: dict[str, list[str | None]] = Field(
        ..., description="Feature view -> the event time (ISO 8601, UTC) of each row's stored values; null: none stored. "
        "Feast applies no TTL to online reads: compare these with your own freshness bound.",
    )
    feature_views: dict[str, str] = Field(..., description="Feature -> the feature view it came from.")
    statuses: dict[str, list[str]] = Field(..., description="Feature -> PRESENT or NOT_FOUND per row (Feast's names).")


def router(ctx: ApiContext) -> APIRouter:
    _viewer, predictor, _developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/features", tags=["features"])

    @api.post(
        "/online", response_model=OnlineResponse, summary="Read features from the online store",
        description="The features of each entity row, read the way enriched predictions read them (one pipelined "
        "round trip on Redis). 422 for an unknown feature service, view or feature, or missing join keys.",
    )
    async def online(body: OnlineRequest, _: Principal = predictor) -> dict[str, Any]:
        enricher = ctx.router.enricher
        store = await asyncio.to_thread(enricher.store)
        features = body.feature_service if body.feature_service is not None else list(body.features or [])
        reader = reader_for(store, features, full_feature_names=body.full_feature_names,
                            timeout_s=ctx.settings.features.online_timeout_s)
        try:
            result = await reader.read_async(body.entities)
        except NotFound as exc:
            raise InvalidInput(exc.message, details={"field": "feature_service"}) from None
        results: dict[str, list[Any]] = {k: v for k, v in result.entities.items()}
        results.update((n, result.values[n]) for n in result.names)
        return {
            "features": result.names,
            "results": results,
            "event_timestamps": {view: [None if t is None else t.isoformat() for t in stamps]
                                 for view, stamps in result.event_timestamps.items()},
            "feature_views": result.view_of,
            "statuses": {n: ["NOT_FOUND" if v is None else "PRESENT" for v in result.values[n]] for n in result.names},
        }

    return api
