"""JobScheduler: the detached actor that starts queued jobs as Ray tasks.

The queue itself is durable in the metadata store; this actor is a driver over
``app.jobs.scheduler.SchedulerCore``. After a restart it rebuilds from the store.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import ray

from actors import get_or_create_actor

log = logging.getLogger(__name__)
ACTOR_NAME = "job_scheduler"


@ray.remote(max_retries=0)
def _run_job_task(job_id: str, settings_kwargs: dict[str, Any]) -> str:
    from app.jobs.runner import run_job
    from app.settings import Settings

    return run_job(job_id, Settings(**settings_kwargs))["status"]


class _RayTask:
    def __init__(self, ref: ray.ObjectRef):
        self.ref = ref

    def done(self) -> bool:
        ready, _ = ray.wait([self.ref], timeout=0)
        return bool(ready)

    def cancel(self) -> None:
        ray.cancel(self.ref, force=True)


class _RayLauncher:
    def __init__(self, settings_kwargs: dict[str, Any], default_cpus: float):
        self.settings_kwargs = settings_kwargs
        self.default_cpus = default_cpus

    def launch(self, job: dict[str, Any]) -> _RayTask:
        resources = job["spec"].get("resources") or {}
        ref = _run_job_task.options(
            num_cpus=resources.get("num_cpus") or self.default_cpus,
            num_gpus=resources.get("num_gpus") or 0,
            name=f"matih-job-{job['job_id'][:12]}",
        ).remote(job["job_id"], self.settings_kwargs)
        return _RayTask(ref)


@ray.remote
class JobScheduler:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.jobs.scheduler import SchedulerCore
        from app.settings import Settings
        from app.store import MetadataStore

        settings = Settings(**settings_kwargs)
        self._interval = settings.jobs.poll_interval_s
        self._store = MetadataStore(settings.database_url)
        self._core = SchedulerCore(
            self._store, _RayLauncher(settings_kwargs, settings.jobs.num_cpus), settings.jobs.max_concurrent
        )
        requeued = self._core.recover()
        if requeued:
            log.warning("queued again after a restart: %s", requeued)
        self._wake = asyncio.Event()
        self._loop_task = asyncio.get_event_loop().create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            try:
                await asyncio.to_thread(self._core.tick)
            except Exception:  # the store may be briefly down; the queue is still there next tick
                log.exception("scheduler tick failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=self._interval)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    async def notify(self) -> None:
        """A job was queued: look at the queue now rather than at the next tick."""
        self._wake.set()

    async def cancel(self, job_id: str, actor: str) -> dict[str, Any]:
        return await asyncio.to_thread(self._core.cancel, job_id, actor)

    async def running(self) -> list[str]:
        return list(self._core.running)

    async def ping(self) -> bool:
        return True


def get_job_scheduler(settings_kwargs: dict[str, Any], num_cpus: float):
    return get_or_create_actor(JobScheduler, ACTOR_NAME, settings_kwargs, num_cpus=num_cpus)
