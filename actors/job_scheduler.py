"""JobScheduler: the detached actor that starts queued jobs as Ray Jobs.

The queue itself is durable in the metadata store; this actor is a driver over
``app.jobs.scheduler.SchedulerCore``. Each job runs as a Ray Job whose entry point is
``python -m app.jobs.run --job-id ID`` (the same entry point ``ray job submit`` takes by hand),
with a submission id derived from the job id and its attempt number. The id is stored before
the submission, so after a restart the actor finds the Ray Jobs of running jobs again and
re-attaches to them instead of starting them twice. Every call to Ray's job API has a timeout
and retries (``job_client``); a submission that still raised is looked up by its id.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
from typing import Any

import ray

from actors import NAMESPACE, get_or_create_actor

log = logging.getLogger(__name__)
ACTOR_NAME = "job_scheduler"
_ENDED = {"SUCCEEDED", "FAILED", "STOPPED"}


def submission_id(job: dict[str, Any]) -> str:
    """The Ray Job submission id of a job's current attempt (deterministic: a second submit
    of the same attempt is refused by Ray)."""
    return f"matih-{job['job_id']}-{job['attempts']}"


class _RayJob:
    """A running job as the scheduler sees it: its Ray Job."""

    def __init__(self, client, sub_id: str):
        self.client = client
        self.sub_id = sub_id

    def status(self) -> str:
        return str(self.client.get_job_status(self.sub_id)).rsplit(".", 1)[-1]

    def done(self) -> bool:
        try:
            return self.status() in _ENDED
        except Exception:  # the dashboard is briefly unreachable: ask again next tick
            log.exception("status of Ray Job %s", self.sub_id)
            return False

    def cancel(self) -> None:
        try:
            self.client.stop_job(self.sub_id)
        except Exception:
            log.exception("stopping Ray Job %s", self.sub_id)

    def describe_end(self) -> str:
        info = self.client.get_job_info(self.sub_id)
        tail = (self.client.get_job_logs(self.sub_id) or "")[-1500:]
        return f"Ray Job {self.sub_id} {str(info.status).rsplit('.', 1)[-1]}: {info.message or ''}\n{tail}".strip()


class _LocalProcess:
    """A job started by hand with ``python -m app.jobs.run --spec`` outside any Ray Job: it
    counts as running while its process lives (checked on the scheduler's host)."""

    def __init__(self, ref: str):
        _, self.host, pid = ref.split(":", 2)
        self.pid = int(pid)

    def done(self) -> bool:
        import os
        import socket

        if socket.gethostname() != self.host:
            return False  # another host's process: the job records its own end
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def cancel(self) -> None:
        pass  # the process sees its job cancelled when it records its end

    def describe_end(self) -> str:
        return f"process {self.pid} on {self.host} exited"


def job_client(address: str, timeout_s: float, attempts: int = 3):
    """Ray's JobSubmissionClient with a timeout on every request and retries of the requests
    that timed out or could not connect. Ray's client sets no timeout (``requests`` then waits
    forever) and offers no hook for one other than its ``_do_request``, which is overridden
    here; the retries are tenacity's."""
    import tenacity
    from ray.job_submission import JobSubmissionClient

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(OSError),  # requests' ConnectionError and Timeout are OSErrors
        wait=tenacity.wait_exponential(multiplier=0.5, max=5),
        stop=tenacity.stop_after_attempt(attempts),
        before_sleep=lambda state: log.warning("Ray job API: %s; trying again", state.outcome.exception()),
        reraise=True,
    )

    class _BoundedJobClient(JobSubmissionClient):
        def _do_request(self, *args: Any, **kwargs: Any):
            kwargs.setdefault("timeout", timeout_s)
            return retrying(super()._do_request, *args, **kwargs)

    return _BoundedJobClient(address)


class _RayJobLauncher:
    def __init__(self, settings, store):
        self.settings = settings
        self.store = store
        self._client = None
        self._started: dict[str, tuple[float, dict[str, float]]] = {}  # job id -> (when, needs)
        self._gpu_manager = None

    @property
    def client(self):
        if self._client is None:
            jobs = self.settings.jobs
            self._client = job_client(
                ray.get_runtime_context().gcs_address, jobs.ray_api_timeout_s, jobs.ray_api_attempts
            )
        return self._client

    def _gpus(self):
        if self._gpu_manager is None:
            try:
                from actors.gpu_manager import get_gpu_manager

                self._gpu_manager = get_gpu_manager(self.settings.actors.num_cpus)
            except ImportError:
                return None
        return self._gpu_manager

    def admit(self, job: dict[str, Any]) -> str | None:
        """None when the cluster has room for the job now, else why it waits."""
        from app.jobs.resources import job_needs

        needs = job_needs(job["kind"], job["spec"], self.settings)
        now = time.monotonic()
        grace = self.settings.jobs.admission_grace_s
        self._started = {k: v for k, v in self._started.items() if now - v[0] < grace}
        starting = sum(v[1]["CPU"] for v in self._started.values())
        free = ray.available_resources()
        free_cpu = float(free.get("CPU", 0)) - starting
        if needs.cpus > free_cpu + 1e-9:
            return f"{needs.cpus:g} CPUs (free now: {max(free_cpu, 0):g})"
        if needs.gpus > 0:
            gm = self._gpus()
            if gm is None:
                return "a GPU manager"
            try:
                ray.get(gm.reserve.remote(job["job_id"], needs.gpus), timeout=10)
            except Exception as exc:
                cause = getattr(exc, "cause", None) or exc
                return f"{needs.gpus:g} GPUs ({getattr(cause, 'message', cause)})"
        self._started[job["job_id"]] = (now, needs.as_dict())
        return None

    def release(self, job_id: str) -> None:
        self._started.pop(job_id, None)
        gm = self._gpu_manager
        if gm is not None:
            gm.release.remote(job_id)

    def launch(self, job: dict[str, Any]) -> _RayJob:
        from app.jobs.resources import job_needs

        sub_id = submission_id(job)
        self.store.set_ray_job(job["job_id"], sub_id)  # before submitting: a crash in between leaves the id to find
        needs = job_needs(job["kind"], job["spec"], self.settings)
        runtime_env = dict(self.settings.jobs.ray_job_runtime_env)
        # The job reads its credentials from its environment, never from an actor method.
        runtime_env["env_vars"] = {**(runtime_env.get("env_vars") or {}), **self.settings.credential_env("job")}
        try:
            self.client.submit_job(
                entrypoint=f"{sys.executable} -m app.jobs.run --job-id {job['job_id']} "
                f"--ray-address {ray.get_runtime_context().gcs_address}",
                submission_id=sub_id,
                entrypoint_num_cpus=needs.driver_cpus,
                metadata={"matih_job_id": job["job_id"], "matih_kind": job["kind"], "matih_name": job["name"]},
                runtime_env=runtime_env or None,
            )
        except RuntimeError as exc:
            if "No available agent" in str(exc):  # the head's job agent is (re)starting
                from app.jobs.scheduler import LaunchDeferred

                raise LaunchDeferred("Ray's job agent on the head node (not available yet)") from exc
            if "already exists" not in str(exc):
                raise
            log.warning("Ray Job %s exists already; attaching to it", sub_id)
        if needs.gpus > 0 and self._gpu_manager is not None:
            self._gpu_manager.started.remote(job["job_id"])  # Ray counts its GPUs as used from now on
        return _RayJob(self.client, sub_id)

    def attach(self, job: dict[str, Any]) -> _RayJob | _LocalProcess | None:
        """The job's Ray Job, running or ended, or None when Ray never saw it."""
        sub_id = job.get("ray_job_id") or submission_id(job)
        if sub_id.startswith("local:"):
            return _LocalProcess(sub_id)
        try:
            self.client.get_job_info(sub_id)
        except RuntimeError as exc:
            if "does not exist" in str(exc) or "404" in str(exc):
                return None
            raise
        return _RayJob(self.client, sub_id)


@ray.remote
class JobScheduler:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.jobs.scheduler import SchedulerCore
        from app.settings import Settings
        from app.store import MetadataStore

        settings = Settings.from_shared(settings_kwargs)  # credentials from its environment
        self._shared_kwargs = settings.shared_kwargs()
        self._interval = settings.jobs.poll_interval_s
        self._idle_interval = max(settings.jobs.idle_poll_interval_s, self._interval)
        self._reconcile_s = settings.jobs.reconcile_interval_s
        self._store = MetadataStore.from_settings(settings)
        self._core = SchedulerCore(
            self._store, _RayJobLauncher(settings, self._store), settings.jobs.max_concurrent,
            max_attempts=settings.jobs.max_attempts,
        )
        self._wake = asyncio.Event()
        self._recovered: dict[str, list[str]] | None = None
        self._loop_task = asyncio.get_event_loop().create_task(self._loop())

    async def _loop(self) -> None:
        import tenacity

        # The dashboard (and the store) may still be starting with the cluster: try until it answers.
        async for attempt in tenacity.AsyncRetrying(
            wait=tenacity.wait_fixed(self._interval),
            before_sleep=lambda state: log.warning("recovering the running jobs failed (%s); trying again",
                                                   state.outcome.exception()),
        ):
            with attempt:
                recovered = await asyncio.to_thread(self._core.recover)
        self._recovered = recovered
        if any(recovered.values()):
            log.warning("after a restart: %s", recovered)
        last_sweep = time.monotonic()
        while True:
            try:
                await asyncio.to_thread(self._core.tick)
                if time.monotonic() - last_sweep >= self._reconcile_s:
                    last_sweep = time.monotonic()
                    await asyncio.to_thread(self._core.report_counts)  # the matih_jobs gauge
                    swept = await asyncio.to_thread(self._core.sweep)
                    if any(swept.values()):
                        log.warning("running jobs without a handle: %s", swept)
            except Exception:  # the store may be briefly down; the queue is still there next tick
                log.exception("scheduler tick failed")
            try:
                interval = self._idle_interval if self._core.idle else self._interval
                await asyncio.wait_for(self._wake.wait(), timeout=interval)
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

    async def recovered(self) -> dict[str, list[str]] | None:
        """What the last start found: re-attached and queued-again job ids."""
        return self._recovered

    async def settings(self) -> dict[str, Any]:
        """The platform's settings without credentials (``Settings.shared_kwargs()``), for job
        entry points started on this cluster; each job has its credentials in its environment."""
        return self._shared_kwargs

    async def ping(self) -> bool:
        return True


def get_job_scheduler(settings_kwargs: dict[str, Any], num_cpus: float, env_vars: dict[str, str] | None = None):
    """The JobScheduler, created with ``settings_kwargs`` (``Settings.shared_kwargs()``) and
    ``env_vars`` (``Settings.credential_env("job_scheduler")``) when it does not exist yet."""
    return get_or_create_actor(JobScheduler, ACTOR_NAME, settings_kwargs, num_cpus=num_cpus, env_vars=env_vars)


def find_job_scheduler():
    """The running JobScheduler of this cluster, or None."""
    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
