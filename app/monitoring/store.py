"""Monitors and their runs in the metadata store (tables ``monitors`` and ``monitor_runs``).

Every change is one transaction with its audit record and its event (``monitor.updated``,
``monitor.deleted``, ``monitor.run.succeeded|failed``). The schedule's next run is moved with a
compare-and-set on ``next_run_at``, so two DriftMonitors (a restart racing the old one) never
queue the same scheduled run twice."""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.events import model as m
from app.pagination import decode_page_token, encode_page_token, str_field
from app.store import MetadataStore
from app.store.models import Endpoint, Monitor, MonitorRun

__all__ = ["MonitorStore", "RUN_STATUSES", "new_run_id"]

RUN_STATUSES = ("queued", "running", "succeeded", "failed")
_AUDIT_TYPE = "monitor"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value).isoformat()


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def new_run_id(now: datetime) -> str:
    """Ids that sort by creation time: a millisecond prefix, then randomness."""
    return f"{int(now.timestamp() * 1000):012x}{uuid.uuid4().hex[:20]}"


def monitor_dict(row: Monitor) -> dict[str, Any]:
    return {
        "endpoint": row.endpoint, "spec": row.spec or {}, "spec_version": row.spec_version,
        "created_by": row.created_by, "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at),
        "next_run_at": _iso(row.next_run_at), "last_run_id": row.last_run_id,
    }


def run_dict(row: MonitorRun, *, full: bool = True) -> dict[str, Any]:
    out = {
        "id": row.id, "endpoint": row.endpoint, "status": row.status, "trigger": row.trigger, "job_id": row.job_id,
        "spec_version": row.spec_version, "model": row.model, "model_version": row.model_version,
        "window": {"since": _iso(row.window_since), "until": _iso(row.window_until), "rows": row.rows},
        "dataset_drift": ((row.drift or {}).get("dataset_drift") if row.drift else None),
        "error": row.error, "created_by": row.created_by, "created_at": _iso(row.created_at),
        "finished_at": _iso(row.finished_at),
    }
    if full:
        drift = dict(row.drift or {})
        out["drift"] = {k: v for k, v in drift.items() if k not in ("prediction_drift", "segments", "alerts",
                                                                     "triggers", "outputs")} or None
        out["prediction_drift"] = drift.get("prediction_drift")
        out["segments"] = drift.get("segments") or {}
        out["alerts"] = drift.get("alerts") or []
        out["triggers"] = drift.get("triggers") or []
        out["outputs"] = drift.get("outputs") or {}
        out["performance"] = row.performance
    return out


class MonitorStore:
    def __init__(self, store: MetadataStore):
        self.store = store

    def _tx(self) -> AbstractContextManager[Session]:
        return self.store.transaction()

    # -- monitors --------------------------------------------------------------------------------
    def put(self, endpoint: str, spec: dict[str, Any], actor: str, now: datetime,
            every_s: float | None) -> tuple[dict[str, Any], bool]:
        """Create or replace ``endpoint``'s monitor: (monitor, created). The first scheduled run
        is due ``every_s`` after now (None: no schedule)."""
        next_run = now + timedelta(seconds=every_s) if every_s else None
        with self._tx() as s:
            if s.get(Endpoint, endpoint) is None:
                raise NotFound(f"endpoint {endpoint!r} does not exist; POST /v1/endpoints creates it")
            row = s.get(Monitor, endpoint, with_for_update=True)
            before = monitor_dict(row) if row is not None else None
            if row is None:
                row = Monitor(endpoint=endpoint, spec=spec, spec_version=1, created_by=actor, created_at=now,
                              updated_at=now, next_run_at=next_run, last_run_id=None)
                s.add(row)
            else:
                row.spec, row.spec_version, row.updated_at = spec, (row.spec_version or 0) + 1, now
                row.next_run_at = next_run
            s.flush()
            after = monitor_dict(row)
            MetadataStore._audit(s, actor, "monitor.put", _AUDIT_TYPE, endpoint, before, after)
            self.store._event(s, (m.MONITOR_UPDATED, m.monitor_subject(endpoint),
                                  {"endpoint": endpoint, "spec": spec, "spec_version": after["spec_version"],
                                   "created": before is None}))
        return after, before is None

    def get(self, endpoint: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(Monitor, endpoint)
            if row is None:
                raise NotFound(f"endpoint {endpoint!r} has no monitor; PUT /v1/monitors/{endpoint} creates one")
            return monitor_dict(row)

    def find(self, endpoint: str) -> dict[str, Any] | None:
        with self._tx() as s:
            row = s.get(Monitor, endpoint)
            return monitor_dict(row) if row is not None else None

    def list(self) -> list[dict[str, Any]]:
        with self._tx() as s:
            return [monitor_dict(r) for r in s.scalars(select(Monitor).order_by(Monitor.endpoint))]

    def delete(self, endpoint: str, actor: str) -> None:
        """Delete the monitor; its runs, alerts and triggers stay readable (history)."""
        with self._tx() as s:
            row = s.get(Monitor, endpoint, with_for_update=True)
            if row is None:
                raise NotFound(f"endpoint {endpoint!r} has no monitor")
            before = monitor_dict(row)
            s.delete(row)
            MetadataStore._audit(s, actor, "monitor.delete", _AUDIT_TYPE, endpoint, before, None)
            self.store._event(s, (m.MONITOR_DELETED, m.monitor_subject(endpoint), {"endpoint": endpoint}))

    def due(self, now: datetime) -> list[dict[str, Any]]:
        """Monitors whose scheduled run is due."""
        with self._tx() as s:
            rows = s.scalars(select(Monitor).where(Monitor.next_run_at.is_not(None), Monitor.next_run_at <= now))
            return [monitor_dict(r) for r in rows]

    def claim_schedule(self, endpoint: str, expect: str | None, next_run_at: datetime) -> bool:
        """Move the schedule on from ``expect`` (the ``next_run_at`` read); False when someone
        else moved it first (its run is theirs to queue)."""
        with self._tx() as s:
            row = s.get(Monitor, endpoint, with_for_update=True)
            if row is None or _iso(_aware(row.next_run_at)) != expect:
                return False
            row.next_run_at = next_run_at
            return True

    # -- runs --------------------------------------------------------------------------------------
    def create_run(self, endpoint: str, *, trigger: str, actor: str, now: datetime, spec_version: int,
                   job_id_of=None) -> dict[str, Any]:
        """A queued run; ``job_id_of(run_id)`` names the job that will run it."""
        run_id = new_run_id(now)
        with self._tx() as s:
            row = MonitorRun(id=run_id, endpoint=endpoint, status="queued", trigger=trigger,
                             job_id=job_id_of(run_id) if job_id_of else None, spec_version=spec_version,
                             created_by=actor, created_at=now)
            s.add(row)
            s.flush()
            return run_dict(row)

    def start_run(self, run_id: str, *, now: datetime, model: str, model_version: str, since: datetime,
                  until: datetime) -> dict[str, Any]:
        with self._tx() as s:
            row = self._run(s, run_id)
            row.status, row.model, row.model_version = "running", model, model_version
            row.window_since, row.window_until = since, until
            return run_dict(row)

    def finish_run(self, run_id: str, *, now: datetime, status: str, rows: int | None = None,
                   drift: dict | None = None, performance: dict | None = None, error: str | None = None,
                   keep: int = 500) -> dict[str, Any]:
        """Record a run's end with its ``monitor.run.*`` event; keep the newest ``keep`` runs."""
        with self._tx() as s:
            row = self._run(s, run_id)
            row.status, row.finished_at, row.rows, row.error = status, now, rows, error
            row.drift, row.performance = drift, performance
            row.drift_detected = bool((drift or {}).get("dataset_drift", {}).get("detected")) if drift else None
            mon = s.get(Monitor, row.endpoint)
            if mon is not None and status == "succeeded":
                mon.last_run_id = run_id
            s.flush()
            out = run_dict(row, full=False)
            event = m.MONITOR_RUN_SUCCEEDED if status == "succeeded" else m.MONITOR_RUN_FAILED
            self.store._event(s, (event, m.monitor_run_subject(row.endpoint, run_id), {
                k: out[k] for k in ("id", "endpoint", "status", "model", "model_version", "window", "dataset_drift",
                                    "error")}))
            old = list(s.scalars(select(MonitorRun.id).where(MonitorRun.endpoint == row.endpoint)
                                 .order_by(MonitorRun.id.desc()).offset(keep)))
            if old:
                s.execute(delete(MonitorRun).where(MonitorRun.id.in_(old)))
        return out

    def fail_queued(self, run_id: str, error: str, now: datetime) -> None:
        """A run whose job never ran (it failed or was cancelled before the run started)."""
        with self._tx() as s:
            s.execute(update(MonitorRun).where(MonitorRun.id == run_id, MonitorRun.status.in_(("queued", "running")))
                      .values(status="failed", error=error, finished_at=now))

    def open_runs(self) -> list[dict[str, Any]]:
        """Runs not finished (queued or running), oldest first: the DriftMonitor settles those
        whose job ended without finishing them (cancelled, or failed before the run began)."""
        with self._tx() as s:
            rows = s.scalars(select(MonitorRun).where(MonitorRun.status.in_(("queued", "running")))
                             .order_by(MonitorRun.id))
            return [run_dict(r, full=False) for r in rows]

    @staticmethod
    def _run(s: Session, run_id: str) -> MonitorRun:
        row = s.get(MonitorRun, run_id)
        if row is None:
            raise NotFound(f"monitor run {run_id!r} does not exist")
        return row

    def get_run(self, run_id: str) -> dict[str, Any]:
        with self._tx() as s:
            return run_dict(self._run(s, run_id))

    def latest_run(self, endpoint: str, *, status: str | None = "succeeded") -> dict[str, Any] | None:
        with self._tx() as s:
            q = select(MonitorRun).where(MonitorRun.endpoint == endpoint).order_by(MonitorRun.id.desc()).limit(1)
            if status:
                q = q.where(MonitorRun.status == status)
            row = s.scalars(q).first()
            return run_dict(row) if row is not None else None

    def list_runs(self, endpoint: str, *, limit: int = 20, page_token: str | None = None,
                  full: bool = False) -> tuple[list[dict[str, Any]], str | None]:
        key = decode_page_token(page_token, str_field)
        with self._tx() as s:
            q = select(MonitorRun).where(MonitorRun.endpoint == endpoint).order_by(MonitorRun.id.desc()).limit(limit + 1)
            if key:
                q = q.where(MonitorRun.id < key[0])
            rows = list(s.scalars(q))
        items = [run_dict(r, full=full) for r in rows[:limit]]
        return items, (encode_page_token(rows[limit - 1].id) if len(rows) > limit else None)
