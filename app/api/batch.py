"""Batch prediction routes: ``/v1/batch/jobs``. A batch job is a job of kind
``batch_prediction`` in the one job system, so ``GET /v1/jobs/{id}`` shows it too."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query

from app.api.app import ApiContext, check_job_owner, role_dependencies
from app.auth import Principal
from app.batch.spec import BatchJobSpec, check_spec_paths
from app.errors import NotFound
from app.registry.mlflow_registry import check_servable
from app.registry.targets import parse_target
from app.schemas import JobAccepted, JobView, Page

KIND = "batch_prediction"


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/batch/jobs", tags=["batch"])

    @api.post(
        "",
        status_code=202,
        response_model=JobAccepted,
        summary="Submit a batch prediction job (Ray Data)",
        description="Checks the model (404 unknown, 409 archived), the input (404 missing, 422 unreadable or "
        "missing columns) and the output folder (409 not empty) now; the job then reads, predicts with an "
        "actor pool of ONNX Runtime sessions and writes. Progress: rows_done of rows_total.",
    )
    async def submit(spec: BatchJobSpec, who: Principal = developer) -> dict[str, Any]:
        from app.batch.predict import plan_batch

        spec = check_spec_paths(spec, ctx.settings)  # before anything is read: 422 naming the field
        ref = parse_target(spec.model)
        if ctx.resolver is not None:
            model = await ctx.resolver.resolve(ref, use_cache=False)
        else:
            model = await asyncio.to_thread(ctx.registry.resolve, ref, use_cache=False)
        check_servable(model)
        await asyncio.to_thread(plan_batch, spec, ctx.settings, model, submit=True)
        if spec.resources.num_cpus is None:
            spec = spec.model_copy(
                update={"resources": spec.resources.model_copy(update={"num_cpus": ctx.settings.batch.driver_num_cpus})}
            )
        name = spec.name or f"batch-{model.name}"
        job = await asyncio.to_thread(
            ctx.store.create_job, KIND, name, spec.model_dump(mode="json"), who.name, priority=spec.priority
        )
        await ctx.jobs.notify()
        return {"job_id": job["job_id"], "status": job["status"]}

    @api.get("", response_model=Page, summary="List batch prediction jobs")
    async def list_batch(
        limit: int = Query(50, ge=1, le=500),
        page_token: str | None = None,
        status: str | None = None,
        _: Principal = viewer,
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(
            ctx.store.list_jobs, kind=KIND, status=status, limit=limit, page_token=page_token
        )
        return {"items": items, "next_page_token": nxt}

    @api.get(
        "/{job_id}", response_model=JobView, summary="A batch prediction job: status, rows_done of rows_total, logs"
    )
    async def get_batch(job_id: str, _: Principal = viewer) -> dict[str, Any]:
        job = await asyncio.to_thread(ctx.store.get_job, job_id, with_logs=True)
        if job["kind"] != KIND:
            raise NotFound(f"job {job_id} is a {job['kind']} job; GET /v1/jobs/{job_id} shows it")
        return job

    @api.post("/{job_id}/cancel", response_model=JobView, summary="Cancel a batch prediction job")
    async def cancel_batch(job_id: str, who: Principal = developer) -> dict[str, Any]:
        job = await asyncio.to_thread(ctx.store.get_job, job_id)
        if job["kind"] != KIND:
            raise NotFound(f"job {job_id} is a {job['kind']} job; POST /v1/jobs/{job_id}/cancel cancels it")
        check_job_owner(job, who)
        return await ctx.jobs.cancel(job_id, who.name)

    return api
