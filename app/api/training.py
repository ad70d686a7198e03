"""Training routes: ``/v1/training/jobs``. A training job is a job of kind ``training`` in the
one job system (``GET /v1/jobs/{id}`` shows it too); the JobScheduler runs it as a Ray Job."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.app import ApiContext, check_job_owner, role_dependencies
from app.auth import Principal
from app.errors import Conflict, InvalidInput, NotFound
from app.jobs.resources import check_fits, job_needs
from app.schemas import JobAccepted, JobView, Page
from app.settings import Settings
from app.training.spec import TrainingJobSpec, check_spec_paths

KIND = "training"


class ResumeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    checkpoint: str | None = Field(
        None, description="A checkpoint's name or path from GET .../checkpoints; default: the latest one."
    )
    name: str | None = Field(None, description="Name of the new job; default: the old name with '-resumed'.")


class CheckpointList(BaseModel):
    job_id: str
    storage_dir: str
    items: list[dict[str, Any]]


def check_training_spec(spec: TrainingJobSpec, settings: Settings) -> None:
    """Refuse at submit time what the job would refuse later: estimators off the allow-list,
    unknown built-in datasets."""
    from app.datasets import builtin_names

    if spec.framework == "sklearn":
        if spec.estimator not in settings.jobs.allowed_estimators:
            raise InvalidInput(
                f"estimator {spec.estimator!r} is not allowed; choose one of: "
                f"{', '.join(settings.jobs.allowed_estimators)}",
                details={"field": "estimator"},
            )
        from app.training.sklearn_trainer import build_estimator

        build_estimator(spec, settings)  # unknown or ill-typed keyword arguments: 422 now, not a failed job
    uri = spec.dataset.uri
    if uri.startswith("builtin://") and uri[len("builtin://"):] not in builtin_names():
        raise InvalidInput(
            f"dataset {uri!r} is not built in; use one of {', '.join('builtin://' + n for n in builtin_names())}",
            details={"field": "dataset.uri"},
        )


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/training/jobs", tags=["training"])

    async def _submit(spec: TrainingJobSpec, who: Principal) -> dict[str, Any]:
        check_training_spec(spec, ctx.settings)
        spec = check_spec_paths(spec, ctx.settings)
        body = spec.model_dump(mode="json")
        if ctx.cluster_resources is not None:
            check_fits(job_needs(KIND, body, ctx.settings), await ctx.cluster_resources(), ctx.settings)
        job = await asyncio.to_thread(ctx.store.create_job, KIND, spec.name, body, who.name, priority=spec.priority)
        await ctx.jobs.notify()
        return {"job_id": job["job_id"], "status": job["status"]}

    async def _training_job(job_id: str) -> dict[str, Any]:
        job = await asyncio.to_thread(ctx.store.get_job, job_id, with_logs=True)
        if job["kind"] != KIND:
            raise NotFound(f"job {job_id} is a {job['kind']} job; GET /v1/jobs/{job_id} shows it")
        return job

    @api.post(
        "", status_code=202, response_model=JobAccepted, summary="Submit a training job",
        description="Queues the job; the JobScheduler starts it as a Ray Job when the cluster has room. "
        "422 for a bad spec (the message names the field and the allowed values) or a job that asks for "
        "resources the cluster does not have (GPUs on a CPU-only cluster).",
    )
    async def submit(spec: TrainingJobSpec, who: Principal = developer) -> dict[str, Any]:
        return await _submit(spec, who)

    @api.get("", response_model=Page, summary="List training jobs")
    async def list_training(
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, status: str | None = None,
        _: Principal = viewer,
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(
            ctx.store.list_jobs, kind=KIND, status=status, limit=limit, page_token=page_token
        )
        return {"items": items, "next_page_token": nxt}

    @api.get("/{job_id}", response_model=JobView, summary="A training job: status, progress, metrics, trials, logs")
    async def get_training(job_id: str, _: Principal = viewer) -> dict[str, Any]:
        return await _training_job(job_id)

    @api.post("/{job_id}/cancel", response_model=JobView, summary="Cancel a queued or running training job")
    async def cancel_training(job_id: str, who: Principal = developer) -> dict[str, Any]:
        check_job_owner(await _training_job(job_id), who)
        return await ctx.jobs.cancel(job_id, who.name)

    @api.get("/{job_id}/checkpoints", response_model=CheckpointList, summary="Checkpoints kept for a job")
    async def checkpoints(job_id: str, _: Principal = viewer) -> dict[str, Any]:
        from app.training.pipeline import run_dir

        job = await _training_job(job_id)
        spec = TrainingJobSpec.model_validate(job["spec"])
        where = run_dir(spec, ctx.settings, job_id)
        if spec.framework != "torch":
            return {"job_id": job_id, "storage_dir": where, "items": []}
        from app.training.torch_checkpoints import list_checkpoints

        items = await asyncio.to_thread(list_checkpoints, where, ctx.settings)
        return {"job_id": job_id, "storage_dir": where, "items": items}

    @api.post(
        "/{job_id}/resume", status_code=202, response_model=JobAccepted,
        summary="Start a new job from one of this job's checkpoints",
        description="The new job has the same spec with checkpoint.resume_from set; it trains the remaining "
        "epochs from the checkpoint's weights and optimiser state.",
    )
    async def resume(job_id: str, body: ResumeRequest | None = None, who: Principal = developer) -> dict[str, Any]:
        from app.training.pipeline import run_dir
        from app.training.torch_checkpoints import list_checkpoints

        body = body or ResumeRequest()
        job = await _training_job(job_id)
        spec = TrainingJobSpec.model_validate(job["spec"])
        if spec.framework != "torch":
            raise Conflict(f"job {job_id} is a {spec.framework} job; only torch jobs keep checkpoints")
        if job["status"] in ("queued", "running"):
            raise Conflict(f"job {job_id} is {job['status']}; resume a job once it has ended (or cancel it first)")
        items = await asyncio.to_thread(list_checkpoints, run_dir(spec, ctx.settings, job_id), ctx.settings)
        if not items:
            raise Conflict(f"job {job_id} kept no checkpoints to resume from")
        if body.checkpoint is None:
            chosen = items[-1]
        else:
            chosen = next((c for c in items if body.checkpoint in (c["name"], c["path"])), None)
            if chosen is None:
                raise NotFound(
                    f"checkpoint {body.checkpoint!r} is not one of job {job_id}'s: "
                    + ", ".join(c["name"] for c in items), details={"field": "checkpoint"},
                )
        new = spec.model_copy(deep=True)
        new.checkpoint.resume_from = chosen["path"]
        new.name = body.name or (spec.name[:120] + "-resumed")
        return await _submit(TrainingJobSpec.model_validate(new.model_dump()), who)

    return api
