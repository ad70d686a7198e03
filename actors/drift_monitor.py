"""DriftMonitor: the detached actor that keeps monitors running and closes the loop. Every
``monitoring.tick_s`` it

1. queues a ``monitor_run`` job for each monitor whose schedule is due (a compare-and-set on
   the monitor's ``next_run_at``, so a restarted actor racing the old one queues a run once);
2. moves every open retraining trigger on (``app.monitoring.loop.RetrainLoop.advance``:
   dataset and training job -> gates -> challenger -> canary rollout -> promotion);
3. settles runs whose job ended without finishing them (cancelled, failed before it began);
4. in a loop of its own, sends pending alert webhooks (retried with backoff) and sets the
   ``matih_alerts_firing`` gauges.

It holds nothing of its own: monitors, runs, alerts and triggers are rows of the metadata
store, so a restart resumes where the store says. The drift work itself runs in the jobs."""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime, timedelta, timezone
from typing import Any

import ray

from actors import NAMESPACE, announce, get_or_create_actor

log = logging.getLogger(__name__)
ACTOR_NAME = "drift_monitor"
MONITOR_ACTOR = "drift-monitor"  # the audit actor of what the monitor does on its own


@ray.remote
class DriftMonitor:
    def __init__(self, settings_kwargs: dict[str, Any]):
        from app.settings import Settings
        from app.store import MetadataStore

        self._settings = Settings.from_shared(settings_kwargs)
        self._store = MetadataStore.from_settings(self._settings)
        self._interval = self._settings.monitoring.tick_s
        self._rounds = 0
        self._last_error: str | None = None
        self._loop_task = asyncio.get_event_loop().create_task(self._loop())

    def _registry(self):
        from app.registry.mlflow_registry import ModelRegistry
        from app.registry.service import RegistryService

        return RegistryService(self._settings, ModelRegistry(self._settings), self._store)

    def _round(self) -> dict[str, Any]:
        from app.monitoring.loop import RetrainingSpec, RetrainLoop
        from app.monitoring.service import submit_run
        from app.monitoring.store import MonitorStore

        now = datetime.now(timezone.utc)
        monitors = MonitorStore(self._store)
        queued = []
        for monitor in monitors.due(now):
            every = ((monitor["spec"] or {}).get("schedule") or {}).get("every_s")
            if not every:
                continue
            if monitors.claim_schedule(monitor["endpoint"], monitor["next_run_at"], now + timedelta(seconds=every)):
                try:
                    queued.append(submit_run(self._store, monitor["endpoint"], trigger="schedule",
                                             actor=MONITOR_ACTOR, now=now)["id"])
                except Exception:  # the endpoint went away under its monitor: the next round tries again
                    log.exception("could not queue a scheduled run of %s", monitor["endpoint"])
        loop = RetrainLoop(self._store, self._settings, self._registry(), notify=announce)
        for monitor in monitors.list():  # schedule policies fire on the clock, not on a run
            retraining = (monitor["spec"] or {}).get("retraining")
            if retraining and retraining.get("enabled", True) and any(
                    p.get("kind") == "schedule" for p in retraining.get("policies") or []):
                try:
                    loop.evaluate(monitor["endpoint"], RetrainingSpec.model_validate(retraining), {}, None, now)
                except Exception:
                    log.exception("schedule policies of %s", monitor["endpoint"])
        moved = loop.advance(now)
        settled = 0
        for run in monitors.open_runs():
            if not run.get("job_id"):
                continue
            try:
                job = self._store.get_job(run["job_id"])
            except Exception:
                job = None
            if job is None or job["status"] in ("failed", "cancelled"):
                why = "its job is gone" if job is None else f"its job {job['status']}: {job.get('error') or ''}"
                monitors.fail_queued(run["id"], why[:2000], now)
                settled += 1
        if queued or moved:
            self._nudge_jobs()
        return {"queued": queued, "moved": [t.get("id") for t in moved or []], "settled": settled}

    def _deliveries(self) -> int:
        """Pending alert webhooks (each retried with backoff) and the alert gauges: a loop of
        their own, so that a receiver that is down never holds up the schedules and the loop."""
        from app.monitoring.alerts import AlertService, AlertsSpec
        from app.monitoring.store import MonitorStore

        monitors = MonitorStore(self._store)
        alerts = AlertService(self._store, self._settings)

        def spec_lookup(endpoint: str):
            monitor = monitors.find(endpoint)
            return AlertsSpec.model_validate(((monitor or {}).get("spec") or {}).get("alerts") or {})

        delivered = alerts.deliver_pending(spec_lookup)
        alerts.export_gauges()
        return delivered

    @staticmethod
    def _nudge_jobs() -> None:
        from actors.job_scheduler import ACTOR_NAME as SCHEDULER

        try:
            ray.get_actor(SCHEDULER, namespace=NAMESPACE).notify.remote()
        except ValueError:  # no scheduler (yet): it finds the queued jobs on its own poll
            pass

    async def _loop(self) -> None:
        self._delivery_task = asyncio.get_event_loop().create_task(self._every(self._deliveries, "alert deliveries"))
        await self._every(self._round, "drift monitor round", count=True)

    async def _every(self, work, what: str, count: bool = False) -> None:
        while True:
            try:
                await asyncio.to_thread(work)
                if count:
                    self._last_error = None
            except Exception as exc:  # the store may be briefly down; everything is still there next round
                self._last_error = repr(exc)
                log.exception("%s failed", what)
            if count:
                self._rounds += 1
            await asyncio.sleep(self._interval)

    async def tick(self) -> dict[str, Any]:
        """One round now (tests): schedules, triggers, settled runs, then the deliveries."""
        out = await asyncio.to_thread(self._round)
        out["delivered"] = await asyncio.to_thread(self._deliveries)
        return out

    async def status(self) -> dict[str, Any]:
        return {"rounds": self._rounds, "tick_s": self._interval, "last_error": self._last_error}

    async def ping(self) -> bool:
        return True


def get_drift_monitor(settings_kwargs: dict[str, Any], num_cpus: float, env_vars: dict[str, str] | None = None):
    """The DriftMonitor, created with ``settings_kwargs`` (``Settings.shared_kwargs()``) and
    ``env_vars`` (``Settings.credential_env("drift_monitor")``) when it does not exist yet."""
    return get_or_create_actor(DriftMonitor, ACTOR_NAME, settings_kwargs, num_cpus=num_cpus, env_vars=env_vars)


def find_drift_monitor():
    try:
        return ray.get_actor(ACTOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
