"""The job queue's policy, independent of Ray: which queued job starts next, how many run at
once, what happens to jobs found running after a restart. The JobScheduler actor drives it
with a launcher that runs jobs as Ray tasks; tests can drive it with a thread launcher."""

from __future__ import annotations

import logging
from typing import Any, Protocol

from app.errors import Conflict, NotFound
from app.store import TERMINAL_STATUSES, MetadataStore

log = logging.getLogger(__name__)


class RunningJob(Protocol):
    def done(self) -> bool: ...

    def cancel(self) -> None: ...


class Launcher(Protocol):
    def launch(self, job: dict[str, Any]) -> RunningJob: ...


class SchedulerCore:
    def __init__(self, store: MetadataStore, launcher: Launcher, max_concurrent: int, max_attempts: int = 3):
        self.store = store
        self.launcher = launcher
        self.max_concurrent = max_concurrent
        self.max_attempts = max_attempts
        self.running: dict[str, RunningJob] = {}

    def recover(self) -> list[str]:
        """After a restart: jobs left ``running`` by the previous incarnation lost their task
        with it; queue them again (the runners are idempotent by job id) or fail them when
        they have used up their attempts. Returns the ids queued again."""
        requeued = []
        for job in self.store.jobs_with_status("running"):
            if job["job_id"] in self.running:
                continue
            try:
                if job["attempts"] >= self.max_attempts:
                    self.store.transition_job(
                        job["job_id"], "failed", expect="running",
                        error=f"lost {job['attempts']} times with its scheduler; not retried again",
                    )
                else:
                    self.store.transition_job(job["job_id"], "queued", expect="running")
                    requeued.append(job["job_id"])
            except Conflict:
                pass
        return requeued

    def tick(self) -> list[str]:
        """Reap finished jobs, then start queued ones while there is room. Returns started ids."""
        for job_id, handle in list(self.running.items()):
            if handle.done():
                del self.running[job_id]
                self._fail_if_still_running(job_id)
        started: list[str] = []
        room = self.max_concurrent - len(self.running)
        if room <= 0:
            return started
        for job in self.store.queued_jobs(limit=room * 4):
            if len(started) >= room:
                break
            try:
                job = self.store.transition_job(job["job_id"], "running", expect="queued")
            except (Conflict, NotFound):
                continue  # cancelled or taken meanwhile
            try:
                self.running[job["job_id"]] = self.launcher.launch(job)
            except Exception as exc:  # could not even start: record it, keep the loop alive
                log.exception("launching job %s failed", job["job_id"])
                self.store.transition_job(job["job_id"], "failed", error=f"could not start: {exc}")
                continue
            started.append(job["job_id"])
        return started

    def cancel(self, job_id: str, actor: str = "system") -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job["status"] in TERMINAL_STATUSES:
            raise Conflict(f"job {job_id} is {job['status']} already; only queued or running jobs can be cancelled")
        out = self.store.transition_job(job_id, "cancelled", actor=actor, expect={"queued", "running"})
        handle = self.running.pop(job_id, None)
        if handle is not None:
            handle.cancel()
        return out

    def _fail_if_still_running(self, job_id: str) -> None:
        """A task that ended without recording its end (killed worker, OOM) fails its job."""
        try:
            self.store.transition_job(
                job_id, "failed", expect="running", error="the job's worker died before the job recorded its result"
            )
        except (Conflict, NotFound):
            pass
