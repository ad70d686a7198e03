"""Canary rollout routes: ``POST/GET /v1/rollouts[/{id}]`` and
``POST /v1/rollouts/{id}/{pause,resume,abort}`` over :class:`app.rollouts.controller.RolloutController`
(the same class the RolloutController actor ticks). Starting, pausing, resuming and aborting
need developer; reading, viewer. After a change to the endpoint's plan the route announces it
to every Gateway replica (``ctx.notify_endpoint_changed``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.rollouts.controller import RolloutController
from app.rollouts.spec import RolloutSpec
from app.schemas import Page


def router(ctx: ApiContext) -> APIRouter:
    from app.registry.service import RegistryService

    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(tags=["rollouts"])
    controller = RolloutController(ctx.store, ctx.settings, RegistryService(ctx.settings, ctx.registry, ctx.store))

    async def _changed(rollout: dict[str, Any]) -> dict[str, Any]:
        await ctx.notify_endpoint_changed(rollout["endpoint"])
        return rollout

    @api.post(
        "/v1/rollouts", status_code=201, summary="Start a canary rollout of a candidate version on an endpoint",
        description="The endpoint's traffic moves to the candidate through `steps` (percent; default 5, 25, 50, "
        "100). Each step runs at least `bake_s` seconds and `min_samples` requests per arm, and is judged against "
        "the baseline on the same traffic window: error rate (two-proportion z-test), latency (Mann-Whitney with "
        "a relative and an absolute floor on the Hodges-Lehmann shift) and, optionally, a quality metric from "
        "feedback (mSPRT). A guardrail failing with significance rolls back at once; passing every step "
        "promotes (alias `champion` to the candidate, `previous` to the version it held). 409 while the "
        "endpoint has a rollout in progress or a traffic plan of its own.",
    )
    async def create(body: RolloutSpec, who: Principal = developer) -> dict[str, Any]:
        return await _changed(await asyncio.to_thread(controller.create, body, who.name))

    @api.get("/v1/rollouts", response_model=Page, summary="Rollouts, newest first")
    async def list_rollouts(
        endpoint: str | None = Query(None, description="Only this endpoint's rollouts."),
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, _: Principal = viewer,
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(controller.list, endpoint, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get("/v1/rollouts/{rollout_id}", summary="A rollout: its status, step and every decision with its statistics")
    async def get(rollout_id: str, _: Principal = viewer) -> dict[str, Any]:
        return await asyncio.to_thread(controller.get, rollout_id)

    @api.post("/v1/rollouts/{rollout_id}/pause", summary="Hold a running rollout at its step (the split stays)")
    async def pause(rollout_id: str, who: Principal = developer) -> dict[str, Any]:
        return await asyncio.to_thread(controller.pause, rollout_id, who.name)

    @api.post("/v1/rollouts/{rollout_id}/resume",
              summary="Run a paused rollout on; its step's window (bake time, samples) starts again")
    async def resume(rollout_id: str, who: Principal = developer) -> dict[str, Any]:
        return await _changed(await asyncio.to_thread(controller.resume, rollout_id, who.name))

    @api.post("/v1/rollouts/{rollout_id}/abort", summary="Stop a rollout: the plan goes, the baseline serves again")
    async def abort(rollout_id: str, who: Principal = developer) -> dict[str, Any]:
        return await _changed(await asyncio.to_thread(controller.abort, rollout_id, who.name))

    return api
