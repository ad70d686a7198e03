"""A/B tests in the metadata store's ``abtests`` table (migration 0005): creating, reading,
listing, stopping and keeping the latest verdict. Each change is written with its audit record
and its ``abtest.*`` event (the outbox) in one transaction, as the store's own rows are."""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import and_, or_, select
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.events.model import ABTEST_CREATED, ABTEST_STOPPED
from app.pagination import decode_page_token, encode_page_token, str_field, time_field
from app.store.models import ABTest, AuditRecord, Event

__all__ = ["ABTestStore", "ABTEST_CREATED", "ABTEST_STOPPED"]

RESOURCE = "abtest"
_ACTOR_CHARS = 128


def _aware(value: datetime | None) -> datetime | None:
    if value is None:
        return None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    value = _aware(value)
    return None if value is None else value.isoformat()


def subject(test_id: str) -> str:
    return f"abtests/{test_id}"


class ABTestStore:
    """The ``abtests`` rows of one metadata store (SQLite or PostgreSQL)."""

    def __init__(self, store):
        self.store = store

    def _tx(self) -> AbstractContextManager[Session]:
        return self.store.transaction()

    @staticmethod
    def as_dict(row: ABTest) -> dict[str, Any]:
        return {
            "id": row.id, "name": row.name, "endpoint": row.endpoint, "spec": row.spec or {}, "status": row.status,
            "result": row.result, "created_by": row.created_by, "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at), "stopped_at": _iso(row.stopped_at),
        }

    def _write_change(self, s: Session, actor: str, action: str, test_id: str, before, after, event_data) -> None:
        now = datetime.now(timezone.utc)
        s.add(AuditRecord(at=now, actor=actor[:_ACTOR_CHARS], action=action, resource_type=RESOURCE,
                          resource_id=test_id, before=before, after=after))
        s.add(Event(event_id=uuid.uuid4().hex, type=action, source=self.store.event_source, subject=subject(test_id),
                    time=now, data=event_data, attempts=0))

    def create(self, name: str, endpoint: str, spec: dict[str, Any], actor: str) -> dict[str, Any]:
        """Store a running test (id: 16 hex digits) with its ``abtest.created`` audit and event."""
        now = datetime.now(timezone.utc)
        row = ABTest(id=uuid.uuid4().hex[:16], name=name, endpoint=endpoint, spec=spec, status="running", result=None,
                     created_by=actor[:_ACTOR_CHARS], created_at=now, updated_at=now, stopped_at=None)
        with self._tx() as s:
            s.add(row)
            s.flush()
            out = self.as_dict(row)
            data = {k: out[k] for k in ("id", "name", "endpoint", "spec", "status", "created_at")}
            self._write_change(s, actor, ABTEST_CREATED, row.id, None, data, data)
        return out

    def get(self, test_id: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(ABTest, test_id) if isinstance(test_id, str) and len(test_id) <= 32 else None
            if row is None:
                raise NotFound(f"A/B test {test_id[:64]!r} does not exist; GET /v1/abtests lists them")
            return self.as_dict(row)

    def list(
        self, endpoint: str | None = None, limit: int = 50, page_token: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Tests newest first (optionally of one endpoint), a page of ``limit`` at a time."""
        key = decode_page_token(page_token, time_field, str_field)
        with self._tx() as s:
            q = select(ABTest).order_by(ABTest.created_at.desc(), ABTest.id.desc()).limit(limit + 1)
            if endpoint is not None:
                q = q.where(ABTest.endpoint == endpoint)
            if key:
                at, last = key
                q = q.where(or_(ABTest.created_at < at, and_(ABTest.created_at == at, ABTest.id < last)))
            rows = list(s.scalars(q))
        items = [self.as_dict(r) for r in rows[:limit]]
        nxt = None
        if len(rows) > limit:
            last_row = rows[limit - 1]
            nxt = encode_page_token(last_row.created_at.isoformat(), last_row.id)  # as loaded, as list_jobs does
        return items, nxt

    def stop(self, test_id: str, actor: str) -> dict[str, Any]:
        """Mark a running test stopped (its analysis window ends now); 409 when it is stopped."""
        now = datetime.now(timezone.utc)
        with self._tx() as s:
            row = s.get(ABTest, test_id) if len(test_id) <= 32 else None
            if row is None:
                raise NotFound(f"A/B test {test_id[:64]!r} does not exist; GET /v1/abtests lists them")
            if row.status != "running":
                raise Conflict(f"A/B test {test_id} is {row.status} already (since {_iso(row.stopped_at)})")
            row.status, row.stopped_at, row.updated_at = "stopped", now, now
            s.flush()
            out = self.as_dict(row)
            data = {"id": row.id, "name": row.name, "endpoint": row.endpoint, "status": "stopped",
                    "stopped_at": out["stopped_at"], "verdict": (row.result or {}).get("verdict")}
            self._write_change(s, actor, ABTEST_STOPPED, row.id, {"status": "running"}, data, data)
        return out

    def set_result(self, test_id: str, result: dict[str, Any]) -> None:
        """Keep the latest analysis' verdict on the row (not audited: it is derived data)."""
        with self._tx() as s:
            row = s.get(ABTest, test_id)
            if row is not None:
                row.result = result
                row.updated_at = datetime.now(timezone.utc)
