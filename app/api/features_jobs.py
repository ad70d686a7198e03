"""Feature store jobs: ``POST /v1/features/materialize`` and ``POST /v1/features/historical``.
Each is a job of the one job system (kinds ``feature_materialize`` and ``feature_historical``,
``app/features/jobs.py``): 202 with its id; ``GET /v1/jobs/{id}`` shows progress and result."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.features.jobs import (
    HISTORICAL_KIND,
    MATERIALIZE_KIND,
    HistoricalSpec,
    MaterializeSpec,
    check_feature_service,
    check_historical_paths,
    check_views,
    parse_spec,
)
from app.schemas import JobAccepted


def _body_schema(model) -> dict[str, Any]:
    """The request body's schema in the OpenAPI document: the route reads the body itself
    (parse_spec), so that a bad window or path is a 422 naming the field like every spec's."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def router(ctx: ApiContext) -> APIRouter:
    _viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/features", tags=["features"])

    def _store():
        from app.features.repo import open_store

        return open_store(ctx.settings)

    async def _submit(kind: str, name: str, body: dict[str, Any], who: Principal) -> dict[str, Any]:
        if ctx.cluster_resources is not None:
            from app.jobs.resources import check_fits, job_needs

            check_fits(job_needs(kind, body, ctx.settings), await ctx.cluster_resources(), ctx.settings)
        job = await asyncio.to_thread(ctx.store.create_job, kind, name, body, who.name)
        await ctx.jobs.notify()
        return {"job_id": job["job_id"], "status": job["status"]}

    @api.post(
        "/materialize",
        status_code=202,
        response_model=JobAccepted,
        summary="Materialize feature views into the online store (a job)",
        openapi_extra=_body_schema(MaterializeSpec),
        description="Body: `{views?, start, end}` (a window) or `{views?, end?, incremental: true}` (from each "
        "view's last materialized end, or end - ttl). 422 naming the field for a bad window or an unknown view. "
        "The job runs Feast's configured engine (features.engine: Ray compute engine in the cluster, or local); "
        "progress: views_done of views_total, rows_written; result: rows written per view.",
    )
    async def materialize(body: dict[str, Any] = Body(...), who: Principal = developer) -> dict[str, Any]:
        spec = parse_spec(MaterializeSpec, body)
        views = await asyncio.to_thread(lambda: check_views(_store(), spec.views))
        name = spec.name or f"materialize-{'-'.join(views)[:150]}"
        return await _submit(MATERIALIZE_KIND, name, spec.model_dump(mode="json"), who)

    @api.post(
        "/historical",
        status_code=202,
        response_model=JobAccepted,
        summary="Build a point-in-time correct training set (a job)",
        openapi_extra=_body_schema(HistoricalSpec),
        description="Body: `{feature_service, entities, output?, full_feature_names?}`: `entities` a parquet of "
        "entity keys, an event_timestamp column and any labels. For each entity row, each feature's latest value "
        "at or before its event_timestamp and within its view's ttl (else null). Result: output URI, rows, "
        "columns, the feature service and its version.",
    )
    async def historical(body: dict[str, Any] = Body(...), who: Principal = developer) -> dict[str, Any]:
        spec = check_historical_paths(parse_spec(HistoricalSpec, body), ctx.settings)
        await asyncio.to_thread(lambda: check_feature_service(_store(), spec.feature_service))
        name = spec.name or f"historical-{spec.feature_service}"
        return await _submit(HISTORICAL_KIND, name, spec.model_dump(mode="json"), who)

    return api
