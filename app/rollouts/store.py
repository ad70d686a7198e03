"""Rollouts in the metadata store (the ``rollouts`` table), and the one transaction that moves
a rollout: its row (compare-and-set on status and step), the endpoint's traffic plan or target,
the audit records and the ``rollout.*`` and ``endpoint.updated`` events commit together or not
at all. So a controller killed at any point finds the rollout and its endpoint agreeing, and a
second controller (or an API call racing a tick) cannot move the same step twice: its
compare-and-set finds the status or step changed and writes nothing."""

from __future__ import annotations

import uuid
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.errors import Conflict, NotFound
from app.events import changes as _events
from app.events import model as _m
from app.pagination import decode_page_token, encode_page_token, str_field
from app.store import MetadataStore, redacted_endpoint
from app.store.models import Endpoint, Rollout

__all__ = ["ACTIVE", "STATUSES", "RolloutStore", "KEEP"]

STATUSES = ("running", "paused", "promoting", "promoted", "rolled_back", "aborted", "failed")
# At most one rollout per endpoint in these; "promoting" = the aliases are being moved.
ACTIVE = ("running", "paused", "promoting")
KEEP = object()  # "leave the endpoint's traffic plan as it is"


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    return (value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value).isoformat()


def rollout_dict(row: Rollout) -> dict[str, Any]:
    steps = (row.spec or {}).get("steps") or [100.0]
    return {
        "id": row.id, "endpoint": row.endpoint, "model": row.model, "baseline": row.baseline,
        "candidate": row.candidate, "spec": row.spec or {}, "status": row.status, "step": row.step,
        "percent": steps[min(row.step, len(steps) - 1)], "step_started_at": _iso(row.step_started_at),
        "decisions": list(row.decisions or []), "error": row.error, "created_by": row.created_by,
        "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at), "finished_at": _iso(row.finished_at),
    }


class RolloutStore:
    """The rollouts table over the metadata store's database (its engine; its event outbox and
    audit log through the store's own helpers, in this module's transactions)."""

    def __init__(self, store: MetadataStore):
        self.store = store

    def _tx(self) -> AbstractContextManager[Session]:
        return self.store.transaction()

    # -- reading ---------------------------------------------------------------------------------
    def get(self, rollout_id: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(Rollout, rollout_id)
            if row is None:
                raise NotFound(f"rollout {rollout_id!r} does not exist; GET /v1/rollouts lists them")
            return rollout_dict(row)

    def list(
        self, *, endpoint: str | None = None, statuses: tuple[str, ...] | None = None, limit: int = 100,
        page_token: str | None = None,
    ) -> tuple[list[dict[str, Any]], str | None]:
        """Newest first (ids sort by creation time)."""
        key = decode_page_token(page_token, str_field)
        with self._tx() as s:
            q = select(Rollout).order_by(Rollout.id.desc()).limit(limit + 1)
            if endpoint is not None:
                q = q.where(Rollout.endpoint == endpoint)
            if statuses is not None:
                q = q.where(Rollout.status.in_(statuses))
            if key:
                q = q.where(Rollout.id < key[0])
            rows = list(s.scalars(q))
        items = [rollout_dict(r) for r in rows[:limit]]
        return items, (encode_page_token(rows[limit - 1].id) if len(rows) > limit else None)

    # -- writing ---------------------------------------------------------------------------------
    def create(
        self, *, endpoint: str, model: str, baseline: str, candidate: str, spec: dict[str, Any], traffic: dict,
        actor: str, now: datetime,
    ) -> dict[str, Any]:
        """Store a running rollout at step 0 and put the step's ``traffic`` plan on its
        endpoint, in one transaction. Conflict when the endpoint has a rollout in progress or a
        traffic plan of its own (an experiment: the rollout would overwrite it)."""
        # Ids sort by creation time: a millisecond prefix, then randomness.
        rollout_id = f"{int(now.timestamp() * 1000):012x}{uuid.uuid4().hex[:20]}"
        with self._tx() as s:
            ep = s.get(Endpoint, endpoint, with_for_update=True)
            if ep is None:
                raise NotFound(f"endpoint {endpoint!r} does not exist; POST /v1/endpoints creates it")
            if (ep.spec or {}).get("traffic"):
                raise Conflict(
                    f"endpoint {endpoint!r} has a traffic plan of its own; remove it (PUT /v1/endpoints/{endpoint}/"
                    "traffic) before a rollout takes over its traffic", details={"endpoint": endpoint},
                )
            row = Rollout(id=rollout_id, endpoint=endpoint, model=model, baseline=baseline, candidate=candidate,
                          spec=spec, status="running", step=0, step_started_at=now, decisions=[], error=None,
                          created_by=actor, created_at=now, updated_at=now, finished_at=None)
            s.add(row)
            self._change_endpoint(s, ep, actor, traffic=traffic)  # written first: on SQLite this takes the lock
            busy = s.scalars(select(Rollout.id).where(Rollout.endpoint == endpoint, Rollout.status.in_(ACTIVE),
                                                      Rollout.id != rollout_id)).first()
            if busy is not None:
                raise Conflict(f"endpoint {endpoint!r} has rollout {busy} in progress; abort it or wait for it",
                               details={"rollout_id": busy})
            after = rollout_dict(row)
            MetadataStore._audit(s, actor, "rollout.create", "rollout", rollout_id, None, after)
            self.store._event(s, _events.rollout_changed(_m.ROLLOUT_STARTED, after))
        return after

    def transition(
        self, rollout_id: str, *, expect: tuple[str, int], actor: str, action: str, event: str | None,
        status: str | None = None, step: int | None = None, step_started_at: datetime | None = None,
        decision: dict[str, Any] | None = None, error: str | None = None, finished_at: datetime | None = None,
        traffic: Any = KEEP, target: str | None = None, now: datetime,
    ) -> dict[str, Any] | None:
        """Move a rollout from ``expect`` = (status, step) as it was read: the row's new status,
        step, window start, error, an appended ``decision``; the endpoint's ``traffic`` plan
        (a dict, None to remove it, KEEP) and ``target``; the audit record ``action`` and the
        event type ``event``. ``error=""`` clears the error. Returns the rollout as it is now, or None when the row no longer
        holds ``expect`` (someone else moved it first): nothing is written then."""
        values: dict[str, Any] = {"updated_at": now}
        for name, value in (("status", status), ("step", step), ("step_started_at", step_started_at),
                            ("error", error), ("finished_at", finished_at)):
            if value is not None:
                values[name] = value
        if error == "":  # "" clears it
            values["error"] = None
        with self._tx() as s:
            # The compare-and-set first: on SQLite it takes the write lock with a fresh snapshot.
            done = s.execute(
                update(Rollout).where(Rollout.id == rollout_id, Rollout.status == expect[0], Rollout.step == expect[1])
                .values(**values).execution_options(synchronize_session=False)
            )
            if done.rowcount != 1:
                if s.get(Rollout, rollout_id) is None:
                    raise NotFound(f"rollout {rollout_id!r} does not exist")
                return None
            current = s.get(Rollout, rollout_id)
            if decision is not None:
                current.decisions = [*(current.decisions or []), decision]
            steps = (current.spec or {}).get("steps") or [100.0]
            before = {"status": expect[0], "step": expect[1], "percent": steps[min(expect[1], len(steps) - 1)]}
            if traffic is not KEEP or target is not None:
                ep = s.get(Endpoint, current.endpoint, with_for_update=True)
                if ep is None:
                    raise NotFound(f"endpoint {current.endpoint!r} of rollout {rollout_id} no longer exists")
                self._change_endpoint(s, ep, actor, traffic=traffic, target=target)
            s.flush()
            after = rollout_dict(current)
            audit_after = {k: after[k] for k in ("status", "step", "percent", "error")}
            if decision is not None:
                audit_after["decision"] = decision
            MetadataStore._audit(s, actor, action, "rollout", rollout_id, before, audit_after)
            if event is not None:
                self.store._event(s, _events.rollout_changed(event, after, decision))
        return after

    def _change_endpoint(self, s: Session, row: Endpoint, actor: str, *, traffic: Any = KEEP,
                         target: str | None = None) -> None:
        """As ``MetadataStore.update_endpoint`` changes an endpoint (spec_version counted up,
        audit record, ``endpoint.updated`` event), inside this module's transaction."""
        before = MetadataStore._endpoint_dict(row)
        spec = dict(row.spec or {})
        if traffic is not KEEP:
            if traffic is None:
                spec.pop("traffic", None)
            else:
                spec["traffic"] = traffic
        if spec != (row.spec or {}):
            row.spec = spec
            row.spec_version = (row.spec_version or 1) + 1
        if target is not None:
            row.target = target
        row.updated_at = datetime.now(timezone.utc)
        s.flush()
        after = MetadataStore._endpoint_dict(row)
        if {k: v for k, v in after.items() if k != "updated_at"} == {k: v for k, v in before.items()
                                                                      if k != "updated_at"}:
            return
        MetadataStore._audit(s, actor, "endpoint.update", "endpoint", row.name, redacted_endpoint(before),
                             redacted_endpoint(after))
        self.store._event(s, _events.endpoint_changed(_m.ENDPOINT_UPDATED, redacted_endpoint(before),
                                                      redacted_endpoint(after)))
