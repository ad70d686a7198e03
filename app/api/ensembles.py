"""Ensemble routes: ``/v1/ensembles``. An ensemble is a registered model whose versions are
ensemble versions (:mod:`app.ensembles.registry`); aliases, stages, cards and endpoints are
the registry's and the endpoints' own routes (``target: "name@champion"``).

``voting`` and ``averaging`` are registered at once (201 with the version); ``stacking``,
``blending``, ``bagging`` and ``boosting`` are queued as a ``kind: ensemble`` job after their
members were pinned and checked (202, like ``POST /v1/training/jobs``)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import JSONResponse

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.ensembles.service import EnsembleService, check_and_pin, create_ensemble
from app.ensembles.spec import EnsembleSpec
from app.schemas import JobAccepted, Page

KIND = "ensemble"
_OFFLOADED = "app.ensembles.service:create_ensemble"


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    svc = EnsembleService(ctx.settings, ctx.registry, ctx.store)
    api = APIRouter(prefix="/v1/ensembles", tags=["ensembles"])

    async def _queue(spec: EnsembleSpec, who: Principal) -> dict[str, Any]:
        from app.jobs.resources import check_fits, job_needs

        spec, defn = await asyncio.to_thread(check_and_pin, spec, ctx.settings, ctx.registry)
        body = spec.model_dump(mode="json")
        if ctx.cluster_resources is not None:
            check_fits(job_needs(KIND, body, ctx.settings), await ctx.cluster_resources(), ctx.settings)
        job = await asyncio.to_thread(ctx.store.create_job, KIND, spec.name, body, who.name, priority=spec.priority)
        await ctx.jobs.notify()
        out = {"job_id": job["job_id"], "status": job["status"]}
        if defn is not None:
            out["members"] = [{"ref": m.ref, "name": m.name, "version": m.version, "weight": m.weight}
                              for m in defn.members]
        return out

    @api.post(
        "", status_code=201, summary="Create an ensemble (voting, averaging) or queue its training job",
        description="voting and averaging: members are pinned to the versions their references resolve to and "
        "checked (same task, input signature and, for classifiers, class list: a 422 naming the member "
        "otherwise); the ensemble is scored on `dataset`'s holdout when given, and registered as a version of "
        "`name` (the first becomes `champion`, later ones `validation.alias_on_pass` when their gates pass). The "
        "same pins and definition as the latest version return that version (200, `created: false`). 201 with the "
        "new version. stacking, blending, bagging, boosting: the same checks, then a `kind: ensemble` job is queued: "
        "202 `{job_id, status}`.",
        responses={202: {"model": JobAccepted, "description": "A trained method's job was queued."}},
    )
    async def create(spec: EnsembleSpec, who: Principal = developer) -> Any:
        if spec.trained:
            return JSONResponse(await _queue(spec, who), status_code=202)
        body = spec.model_dump(mode="json")
        if ctx.registry_offload is None:
            out = await asyncio.to_thread(create_ensemble, ctx.settings, ctx.registry, ctx.store, body, who.name)
        else:  # it loads and runs the members' ONNX graphs: not in the Gateway's process
            out = await ctx.registry_offload(_OFFLOADED, body, who.name)
        await ctx.notify_model_changed(spec.name)
        # the same pins and definition as the latest version: that version, nothing made (200)
        return JSONResponse(out, status_code=201 if out.get("created", True) else 200)

    @api.get("", response_model=Page, summary="List ensembles (registered models tagged matih.kind=ensemble)")
    async def list_ensembles(
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, _: Principal = viewer
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(svc.list, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get("/{name}", summary="An ensemble: its current definition, versions with pinned members and metrics")
    async def get_ensemble(name: str, _: Principal = viewer) -> dict[str, Any]:
        return await asyncio.to_thread(svc.get, name)

    return api
