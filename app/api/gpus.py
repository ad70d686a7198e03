"""GPU routes: ``GET /v1/gpus``, the cluster's GPU inventory and reservations.

The route reads ``ctx.gpus``: any object with an async ``snapshot()`` returning the dict of
``app.gpus.GpuInventory.snapshot`` (the Gateway's is a proxy to the GPUManager actor; tests
use a GpuInventory over fixed resources).
"""

from __future__ import annotations

from typing import Any, Protocol

from fastapi import APIRouter
from pydantic import BaseModel, Field

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.errors import DependencyUnavailable


class GpuSource(Protocol):
    async def snapshot(self) -> dict[str, Any]: ...


class GpuDevice(BaseModel):
    index: int = Field(..., description="NVML index of the device on the GPUManager's node.")
    name: str | None = Field(None, description="Device name, e.g. 'NVIDIA H100 80GB HBM3'.")
    uuid: str | None = Field(None, description="Device UUID.")
    memory_total_mib: int | None = Field(None, description="Memory of the device, MiB.")
    memory_used_mib: int | None = Field(None, description="Memory in use, MiB.")
    utilization_pct: int | None = Field(None, description="GPU utilisation over the last sample period, %.")


class GpuReservation(BaseModel):
    job_id: str = Field(..., description="The job holding the claim.")
    gpus: float = Field(..., description="GPUs claimed (fractions of one GPU allowed).")
    since: str = Field(..., description="When the claim was made (ISO 8601, UTC).")
    started: bool = Field(False, description="Whether the job runs (Ray then counts its GPUs itself).")


class GpuInventoryView(BaseModel):
    gpus_total: float = Field(..., description="GPUs of the Ray cluster (all nodes).")
    gpus_available: float = Field(
        ..., description="GPUs free for new work: Ray's available GPUs minus claims of jobs not started yet."
    )
    devices: list[GpuDevice] = Field(default_factory=list, description="Devices NVML reports; empty without NVML.")
    reservations: list[GpuReservation] = Field(default_factory=list, description="Current claims, oldest first.")
    nvml: bool = Field(False, description="Whether NVML was readable (the nvidia-ml-py package and a driver).")


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, _developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/gpus", tags=["gpus"])

    @api.get(
        "",
        response_model=GpuInventoryView,
        summary="GPU inventory and reservations",
        description="Totals and availability from Ray's resources, device details from NVML where present, "
        "and the GPU claims of jobs. A cluster without GPUs answers zeros and no devices.",
    )
    async def gpus(_: Principal = viewer) -> dict[str, Any]:
        source: GpuSource | None = getattr(ctx, "gpus", None)
        if source is None:
            raise DependencyUnavailable("the GPU manager is not configured in this gateway")
        return await source.snapshot()

    return api
