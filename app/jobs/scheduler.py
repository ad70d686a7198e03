"""The job queue's policy, independent of Ray: which queued job starts next, how many run at
once, whether the cluster has room for it, what happens to jobs found running after a
restart. The JobScheduler actor drives it with a launcher that runs each job as a Ray Job;
unit tests drive it with a thread launcher.

Durability comes from the metadata store: a job is ``queued`` until a scheduler moves it to
``running`` (a compare-and-set, so two schedulers never both start it), and the id of the Ray
Job that runs it is stored before that Ray Job is submitted. A restarted scheduler therefore
re-attaches to Ray Jobs still running, and queues again only jobs whose Ray Job never
existed, so no job runs twice. The same reconciliation settles a launch that raised (Ray may
have accepted the submission before the answer was lost: the job is attached, not failed) and,
every ``jobs.reconcile_interval_s`` (``sweep``), any job recorded running without a handle.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Protocol

from app import metrics
from app.errors import Conflict, NotFound
from app.store import TERMINAL_STATUSES, MetadataStore

log = logging.getLogger(__name__)


class LaunchDeferred(Exception):
    """The launcher cannot start jobs right now (e.g. Ray's job agent is still starting); the
    job goes back to the queue instead of failing."""


class RunningJob(Protocol):
    def done(self) -> bool: ...

    def cancel(self) -> None: ...


class Launcher(Protocol):
    """Starts jobs. ``attach``, ``admit`` and ``release`` are optional (see SchedulerCore)."""

    def launch(self, job: dict[str, Any]) -> RunningJob: ...


class SchedulerCore:
    def __init__(self, store: MetadataStore, launcher: Launcher, max_concurrent: int, max_attempts: int = 3):
        self.store = store
        self.launcher = launcher
        self.max_concurrent = max_concurrent
        self.max_attempts = max_attempts
        self.running: dict[str, RunningJob] = {}
        self._waiting: dict[str, str] = {}  # job id -> why it is not started yet (last reason recorded)

    # -- launcher hooks with defaults -------------------------------------------------------
    def _attach(self, job: dict[str, Any]) -> RunningJob | None:
        attach = getattr(self.launcher, "attach", None)
        return attach(job) if attach is not None else None

    def _admit(self, job: dict[str, Any]) -> str | None:
        admit = getattr(self.launcher, "admit", None)
        return admit(job) if admit is not None else None

    def _release(self, job_id: str) -> None:
        release = getattr(self.launcher, "release", None)
        if release is not None:
            try:
                release(job_id)
            except Exception:  # a reservation left behind is cleaned by the GPU manager's own view
                log.exception("releasing the resources of job %s failed", job_id)

    # -- the loop ---------------------------------------------------------------------------
    def recover(self) -> dict[str, list[str]]:
        """After a restart, and now and then afterwards (``sweep``): re-attach to jobs whose Ray
        Job still exists (running or ended: the next tick reaps the ended ones); queue again jobs
        whose Ray Job never started (the runners are idempotent by job id), or fail them when
        they have used up their attempts. So no job stays ``running`` without a handle.
        Returns {"reattached": [...], "requeued": [...]}."""
        out: dict[str, list[str]] = {"reattached": [], "requeued": []}
        running = self.store.jobs_with_status("running")
        ended = set(self.running) - {job["job_id"] for job in running}
        for job_id in ended:  # recorded its end (or was cancelled) without its handle seeing it end:
            if self.running.pop(job_id, None) is not None:  # e.g. a process on another host
                self._release(job_id)
                self._ended(job_id)
        for job in running:
            job_id = job["job_id"]
            if job_id in self.running:
                continue
            try:
                handle = self._attach(job)
            except Exception:
                log.exception("looking for the Ray Job of %s failed; it stays running and is looked at again", job_id)
                continue
            if handle is not None:
                self.running[job_id] = handle
                out["reattached"].append(job_id)
                continue
            try:
                self._release(job_id)
                if job["attempts"] >= self.max_attempts:
                    _record_end(self.store.transition_job(
                        job_id, "failed", expect="running",
                        error=f"lost {job['attempts']} times with its scheduler; not retried again",
                    ))
                else:
                    self.store.transition_job(job_id, "queued", expect="running")
                    out["requeued"].append(job_id)
            except Conflict:
                pass
        return out

    @property
    def idle(self) -> bool:
        """No job running and none seen queued but held back (resources, launcher): the driver
        may look at the queue less often, since a submission wakes it."""
        return not self.running and not self._waiting

    def tick(self) -> list[str]:
        """Reap finished jobs, then start queued ones while there is room. Returns started ids."""
        for job_id, handle in list(self.running.items()):
            if handle.done():
                del self.running[job_id]
                self._release(job_id)
                self._fail_if_still_running(job_id, handle)
                self._ended(job_id)
        started: list[str] = []
        room = self.max_concurrent - len(self.running)
        if room <= 0:
            return started
        for job in self.store.queued_jobs(limit=room * 4 + len(self._waiting)):
            if len(started) >= room:
                break
            reason = self._admit(job)
            if reason is not None:
                self._note_waiting(job["job_id"], reason)
                continue
            try:
                job = self.store.transition_job(job["job_id"], "running", expect="queued")
            except (Conflict, NotFound):
                self._release(job["job_id"])
                continue  # cancelled or taken meanwhile
            self._waiting.pop(job["job_id"], None)
            try:
                self.running[job["job_id"]] = self.launcher.launch(job)
            except LaunchDeferred as exc:
                self._release(job["job_id"])
                self.store.transition_job(job["job_id"], "queued", expect="running")
                self._note_waiting(job["job_id"], str(exc))
                break  # the launcher is not ready: try again next tick
            except Exception as exc:
                try:
                    handle = self._reconcile(job, exc)
                except Exception:  # Ray cannot say: the job stays running for the next sweep to settle
                    log.exception("launching job %s raised (%s); whether Ray has it is unknown", job["job_id"], exc)
                    continue
                if handle is None:  # could not even start: record it, keep the loop alive
                    self._release(job["job_id"])
                    _record_end(self.store.transition_job(
                        job["job_id"], "failed", expect="running", error=f"could not start: {exc}"
                    ))
                    continue
                self.running[job["job_id"]] = handle
            started.append(job["job_id"])
        return started

    def sweep(self) -> dict[str, list[str]]:
        """``recover`` for jobs found ``running`` without a handle in this scheduler: a launch
        whose outcome Ray could not tell, a lookup that failed at the last try, a job started
        by hand meanwhile. Called by the driver every ``jobs.reconcile_interval_s``."""
        return self.recover()

    def _reconcile(self, job: dict[str, Any], exc: Exception) -> RunningJob | None:
        """A launch raised; it may still have reached Ray (a submission that timed out after
        Ray accepted it). The job's Ray Job when Ray has it, None when Ray says it has none;
        raises when Ray cannot be asked."""
        handle = self._attach(job)
        if handle is None:
            log.error("launching job %s failed: %s", job["job_id"], exc)
        else:
            log.warning("launching job %s raised (%s) but Ray has its Ray Job: attached to it", job["job_id"], exc)
        return handle

    def cancel(self, job_id: str, actor: str = "system") -> dict[str, Any]:
        job = self.store.get_job(job_id)
        if job["status"] in TERMINAL_STATUSES:
            raise Conflict(f"job {job_id} is {job['status']} already; only queued or running jobs can be cancelled")
        out = self.store.transition_job(job_id, "cancelled", actor=actor, expect={"queued", "running"})
        handle = self.running.pop(job_id, None)
        if handle is None and job["status"] == "running":
            handle = self._attach(job)  # started by another incarnation or by hand: stop it all the same
        if handle is not None:
            handle.cancel()
        self._release(job_id)
        self._waiting.pop(job_id, None)
        _record_end(out)
        return out

    def report_counts(self) -> dict[tuple[str, str], int]:
        """Set the jobs-per-(kind, state) gauge from the store (the driver calls it periodically);
        returns the counts."""
        counts = self.store.job_counts()
        metrics.jobs_in_state(counts)
        return counts

    def _ended(self, job_id: str) -> None:
        """A job this scheduler ran has ended: its duration into the job metrics."""
        try:
            _record_end(self.store.get_job(job_id))
        except NotFound:
            pass

    def _note_waiting(self, job_id: str, reason: str) -> None:
        if self._waiting.get(job_id) == reason:
            return
        self._waiting[job_id] = reason
        try:
            self.store.update_job_progress(job_id, {"waiting_for": reason}, f"waiting: {reason}")
        except NotFound:
            self._waiting.pop(job_id, None)

    def _fail_if_still_running(self, job_id: str, handle: RunningJob) -> None:
        """A job that ended without recording its end (killed worker, OOM, a crash before the
        runner started) fails, with what its launcher knows of how it ended."""
        describe = getattr(handle, "describe_end", None)
        detail = ""
        if describe is not None:
            try:
                detail = describe() or ""
            except Exception:
                detail = ""
        try:
            self.store.transition_job(
                job_id, "failed", expect="running",
                error="the job's process ended before the job recorded its result" + (f": {detail}" if detail else ""),
            )
        except (Conflict, NotFound):
            pass


def job_seconds(job: dict[str, Any]) -> float:
    """Seconds from a job's start to its end; 0 for a job that never started (cancelled queued)."""
    if not job.get("started_at") or not job.get("finished_at"):
        return 0.0
    return (datetime.fromisoformat(job["finished_at"]) - datetime.fromisoformat(job["started_at"])).total_seconds()


def _record_end(job: dict[str, Any]) -> None:
    if job["status"] in TERMINAL_STATUSES:
        metrics.job_finished(job["kind"], job["status"], job_seconds(job))
