"""GPUManager: the detached actor that keeps the cluster's GPU reservations and answers
``GET /v1/gpus``. A driver over ``app.gpus.GpuInventory``: it reads Ray's cluster and
available resources itself and hands them to the core.

NVML describes the devices of the node this actor runs on. Reservations live in the actor;
after a restart it starts with none (jobs that run already hold their GPUs in Ray, so the
availability it reports stays right; only claims of jobs not yet started are forgotten).
"""

from __future__ import annotations

import asyncio
from typing import Any

import ray

from actors import get_or_create_actor

ACTOR_NAME = "gpu_manager"


@ray.remote
class GPUManager:
    def __init__(self, use_nvml: bool = True):
        from app.gpus import GpuInventory

        self._inventory = GpuInventory(use_nvml=use_nvml)

    @staticmethod
    def _resources() -> tuple[dict[str, float], dict[str, float]]:
        return ray.cluster_resources(), ray.available_resources()

    async def snapshot(self) -> dict[str, Any]:
        cluster, available = await asyncio.to_thread(self._resources)
        return await asyncio.to_thread(self._inventory.snapshot, cluster, available)

    async def reserve(self, job_id: str, gpus: float) -> dict[str, Any]:
        """Claim GPUs for a job about to start; raises app.gpus.GpuUnavailable (409) when they
        are not free. Idempotent per job id."""
        cluster, available = await asyncio.to_thread(self._resources)
        return self._inventory.reserve(job_id, gpus, cluster, available)

    async def started(self, job_id: str) -> bool:
        """The job's Ray work now holds its GPUs (Ray counts them from here on)."""
        return self._inventory.started(job_id)

    async def release(self, job_id: str) -> bool:
        return self._inventory.release(job_id)

    async def ping(self) -> bool:
        return True


def get_gpu_manager(num_cpus: float, use_nvml: bool = True):
    """The GPUManager singleton (namespace ``matih``), created on first use."""
    return get_or_create_actor(GPUManager, ACTOR_NAME, use_nvml, num_cpus=num_cpus)
