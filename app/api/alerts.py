"""Alert routes: ``GET /v1/alerts[/{id}]`` and ``POST /v1/alerts/{id}/ack`` over
:class:`app.monitoring.alerts.AlertService` (the same class the DriftMonitor actor writes
alerts with). Reading needs viewer; acknowledging, developer."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Body, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.monitoring.alerts import AlertService
from app.schemas import Page


class AckBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: str | None = Field(None, max_length=2000, description="Why, or what is being done; kept on the alert.")


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(tags=["alerts"])
    service = AlertService(ctx.store, ctx.settings)

    @api.get("/v1/alerts", response_model=Page, summary="Alerts of the monitors' rules, newest first")
    async def list_alerts(
        endpoint: str | None = Query(None, description="Only this endpoint's alerts."),
        status: Literal["firing", "acknowledged", "resolved"] | None = Query(None, description="Only alerts in it."),
        severity: Literal["info", "warning", "critical"] | None = Query(None, description="Only this severity."),
        limit: int = Query(100, ge=1, le=500), page_token: str | None = None, _: Principal = viewer,
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(service.list, endpoint, status, severity, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get("/v1/alerts/{alert_id}", summary="An alert: its rule, value, counts and webhook deliveries")
    async def get(alert_id: str, _: Principal = viewer) -> dict[str, Any]:
        return await asyncio.to_thread(service.get, alert_id)

    @api.post(
        "/v1/alerts/{alert_id}/ack", summary="Acknowledge a firing alert",
        description="The alert stays open (it still counts repeated firings and resolves when its rule clears) but "
        "is not reminded any more. Acknowledging an acknowledged alert returns it unchanged; a resolved one is 409.",
    )
    async def ack(alert_id: str, body: AckBody | None = Body(None), who: Principal = developer) -> dict[str, Any]:
        return await asyncio.to_thread(service.ack, alert_id, who.name, body.note if body else None)

    return api
