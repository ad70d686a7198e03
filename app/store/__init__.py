"""The metadata store: endpoints, jobs, the audit log and API tokens.

SQLite in the local profile, PostgreSQL in production; the same code and the same Alembic
migrations for both. Every mutation writes its audit record in the same transaction, so a
change is never stored without its record (nor the other way round).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Conflict, DependencyUnavailable, InvalidInput, NotFound
from app.pagination import decode_page_token, encode_page_token, int_field, str_field, time_field
from app.store.models import ApiToken, AuditRecord, Endpoint, Job

__all__ = ["MetadataStore", "JOB_STATUSES", "TERMINAL_STATUSES"]

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
_ALLOWED_TRANSITIONS = {
    "queued": {"running", "cancelled", "failed"},
    "running": {"succeeded", "failed", "cancelled", "queued"},  # queued again = retry after a crash
    "succeeded": set(),
    "failed": {"queued"},  # an explicit retry
    "cancelled": {"queued"},
}
_MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_MAX_LOG_CHARS = 64 * 1024


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite drops the zone; everything is stored in UTC
        value = value.replace(tzinfo=timezone.utc)
    return value.isoformat()


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def redacted_endpoint(endpoint: dict[str, Any]) -> dict[str, Any]:
    """An endpoint with the values of ``config.headers`` (credentials for a remote server, e.g.
    a Triton ``Authorization`` header) replaced by ``***`` and the names kept: what the API
    sends back and what the audit log keeps. The credential itself lives only in the endpoint
    row."""
    config = endpoint.get("config") or {}
    if isinstance(config.get("headers"), dict):
        return {**endpoint, "config": {**config, "headers": {k: "***" for k in config["headers"]}}}
    return endpoint


class MetadataStore:
    """Facade over the metadata database. Thread-safe; one per process is enough."""

    def __init__(self, url: str, *, echo: bool = False):
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True, "future": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._migrate_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the schema to the newest migration (idempotent; safe from many processes)."""
        from alembic import command
        from alembic.config import Config

        with self._migrate_lock, self.engine.begin() as conn:
            if self.engine.dialect.name == "postgresql":
                # Several processes may start at once; one migrates, the others wait.
                conn.execute(text("SELECT pg_advisory_xact_lock(7160310)"))
            cfg = Config()
            cfg.set_main_option("script_location", str(_MIGRATIONS))
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except OperationalError as exc:
            raise DependencyUnavailable(f"metadata store unreachable at {self._safe_url()}: {exc.orig}") from None

    def dispose(self) -> None:
        self.engine.dispose()

    def _safe_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def _tx(self) -> Iterator[Session]:
        try:
            with self._sessions.begin() as session:
                yield session
        except OperationalError as exc:
            raise DependencyUnavailable(f"metadata store unreachable at {self._safe_url()}: {exc.orig}") from None

    @staticmethod
    def _audit(session: Session, actor: str, action: str, rtype: str, rid: str, before, after) -> None:
        session.add(
            AuditRecord(
                at=_now(), actor=actor, action=action, resource_type=rtype, resource_id=rid, before=before, after=after
            )
        )

    # -- endpoints -------------------------------------------------------------------------
    @staticmethod
    def _endpoint_dict(row: Endpoint) -> dict[str, Any]:
        return {
            "name": row.name,
            "target": row.target,
            "runtime": row.runtime,
            "config": row.config or {},
            "created_by": row.created_by,
            "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at),
        }

    def create_endpoint(self, name: str, target: str, runtime: str, config: dict, actor: str) -> dict[str, Any]:
        now = _now()
        row = Endpoint(
            name=name, target=target, runtime=runtime, config=config, created_by=actor, created_at=now, updated_at=now
        )
        try:
            with self._tx() as s:
                if s.get(Endpoint, name) is not None:
                    raise Conflict(f"endpoint {name!r} exists already; PUT /v1/endpoints/{name} changes it")
                s.add(row)
                s.flush()
                after = self._endpoint_dict(row)
                self._audit(s, actor, "endpoint.create", "endpoint", name, None, redacted_endpoint(after))
        except IntegrityError:
            raise Conflict(f"endpoint {name!r} exists already; PUT /v1/endpoints/{name} changes it") from None
        return after

    def get_endpoint(self, name: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(Endpoint, name)
            if row is None:
                raise NotFound(f"endpoint {name!r} does not exist; GET /v1/endpoints lists the endpoints")
            return self._endpoint_dict(row)

    def list_endpoints(self, limit: int = 100, page_token: str | None = None) -> tuple[list[dict], str | None]:
        key = decode_page_token(page_token, str_field)
        with self._tx() as s:
            q = select(Endpoint).order_by(Endpoint.name).limit(limit + 1)
            if key:
                q = q.where(Endpoint.name > key[0])
            rows = list(s.scalars(q))
        items = [self._endpoint_dict(r) for r in rows[:limit]]
        nxt = encode_page_token(rows[limit - 1].name) if len(rows) > limit else None
        return items, nxt

    def update_endpoint(self, name: str, changes: dict[str, Any], actor: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(Endpoint, name, with_for_update=True)
            if row is None:
                raise NotFound(f"endpoint {name!r} does not exist; POST /v1/endpoints creates it")
            before = self._endpoint_dict(row)
            for field in ("target", "runtime", "config"):
                if field in changes and changes[field] is not None:
                    setattr(row, field, changes[field])
            row.updated_at = _now()
            s.flush()
            after = self._endpoint_dict(row)
            self._audit(s, actor, "endpoint.update", "endpoint", name, redacted_endpoint(before), redacted_endpoint(after))
        return after

    def delete_endpoint(self, name: str, actor: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(Endpoint, name, with_for_update=True)
            if row is None:
                raise NotFound(f"endpoint {name!r} does not exist")
            before = self._endpoint_dict(row)
            s.delete(row)
            self._audit(s, actor, "endpoint.delete", "endpoint", name, redacted_endpoint(before), None)
        return before

    # -- jobs ------------------------------------------------------------------------------
    @staticmethod
    def _job_dict(row: Job) -> dict[str, Any]:
        return {
            "job_id": row.id,
            "kind": row.kind,
            "name": row.name,
            "status": row.status,
            "priority": row.priority,
            "spec": row.spec,
            "result": row.result or {},
            "progress": row.progress or {},
            "error": row.error,
            "attempts": row.attempts,
            "ray_job_id": row.ray_job_id,
            "created_by": row.created_by,
            "created_at": _iso(row.created_at),
            "started_at": _iso(row.started_at),
            "finished_at": _iso(row.finished_at),
        }

    def create_job(
        self, kind: str, name: str, spec: dict, actor: str, *, priority: int = 0, job_id: str | None = None,
        running_as: str | None = None,
    ) -> dict[str, Any]:
        """Queue a job. With ``running_as`` (a Ray Job submission id) the job is recorded as
        already running there: a job started by hand with ``ray job submit``, which no
        scheduler may start a second time."""
        job_id = job_id or uuid.uuid4().hex
        with self._tx() as s:
            existing = s.get(Job, job_id)
            if existing is not None:  # idempotent by id: submitting twice returns the same job
                return self._job_dict(existing)
            row = Job(
                id=job_id,
                kind=kind,
                name=name,
                status="running" if running_as else "queued",
                priority=priority,
                spec=spec,
                result={},
                progress={},
                logs="",
                attempts=1 if running_as else 0,
                ray_job_id=running_as,
                created_by=actor,
                created_at=_now(),
                started_at=_now() if running_as else None,
            )
            s.add(row)
            s.flush()
            after = self._job_dict(row)
            self._audit(s, actor, "job.create", "job", job_id, None, {"kind": kind, "name": name, "spec": spec})
        return after

    def get_job(self, job_id: str, *, with_logs: bool = False) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(Job, job_id)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist; GET /v1/jobs lists the jobs")
            out = self._job_dict(row)
            if with_logs:
                out["logs"] = row.logs or ""
            return out

    def list_jobs(
        self, *, kind: str | None = None, status: str | None = None, limit: int = 100, page_token: str | None = None
    ) -> tuple[list[dict], str | None]:
        key = decode_page_token(page_token, time_field, str_field)
        with self._tx() as s:
            q = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
            if kind:
                q = q.where(Job.kind == kind)
            if status:
                q = q.where(Job.status == status)
            if key:
                at, job_id = key
                q = q.where((Job.created_at < at) | ((Job.created_at == at) & (Job.id < job_id)))
            rows = list(s.scalars(q))
        items = [self._job_dict(r) for r in rows[:limit]]
        nxt = None
        if len(rows) > limit:
            last = rows[limit - 1]
            nxt = encode_page_token(last.created_at.isoformat(), last.id)
        return items, nxt

    def transition_job(
        self,
        job_id: str,
        status: str,
        *,
        actor: str = "system",
        expect: str | set[str] | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """Move a job to ``status`` if that is legal from where it is (and, with ``expect``, only
        from that status). Raises Conflict otherwise, so two schedulers never both start a job."""
        if status not in JOB_STATUSES:
            raise InvalidInput(f"job status {status!r} is not one of {', '.join(JOB_STATUSES)}")
        with self._tx() as s:
            row = s.get(Job, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            expected = {expect} if isinstance(expect, str) else expect
            if expected is not None and row.status not in expected:
                raise Conflict(f"job {job_id} is {row.status}, not {' or '.join(sorted(expected))}")
            if status not in _ALLOWED_TRANSITIONS[row.status]:
                raise Conflict(f"job {job_id} is {row.status}; it cannot become {status}")
            before = row.status
            row.status = status
            now = _now()
            if status == "running":
                row.started_at = now
                row.attempts = (row.attempts or 0) + 1
            if status in TERMINAL_STATUSES:
                row.finished_at = now
            if status == "queued":
                row.finished_at = None
            for key in ("result", "progress", "error", "ray_job_id"):
                if key in fields:
                    setattr(row, key, fields[key])
            s.flush()
            out = self._job_dict(row)
            self._audit(s, actor, f"job.{status}", "job", job_id, {"status": before}, {"status": status})
        return out

    def update_job_progress(self, job_id: str, progress: dict[str, Any], log: str | None = None) -> None:
        with self._tx() as s:
            row = s.get(Job, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            row.progress = {**(row.progress or {}), **progress}
            if log:
                row.logs = ((row.logs or "") + log.rstrip("\n") + "\n")[-_MAX_LOG_CHARS:]

    def set_ray_job(self, job_id: str, ray_job_id: str) -> None:
        """Record which Ray Job runs the job (before it is submitted, so a crash in between
        still leaves the id to look for)."""
        with self._tx() as s:
            row = s.get(Job, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            row.ray_job_id = ray_job_id

    def queued_jobs(self, limit: int = 100) -> list[dict[str, Any]]:
        with self._tx() as s:
            q = (
                select(Job)
                .where(Job.status == "queued")
                .order_by(Job.priority.desc(), Job.created_at, Job.id)
                .limit(limit)
            )
            return [self._job_dict(r) for r in s.scalars(q)]

    def jobs_with_status(self, status: str) -> list[dict[str, Any]]:
        with self._tx() as s:
            return [self._job_dict(r) for r in s.scalars(select(Job).where(Job.status == status))]

    # -- audit -----------------------------------------------------------------------------
    def record_audit(
        self, actor: str, action: str, resource_type: str, resource_id: str, before: Any, after: Any
    ) -> None:
        """Record a mutation whose state lives outside this store (MLflow, Feast): who, what,
        before and after. Changes to this store's own rows are audited in their transaction."""
        with self._tx() as s:
            self._audit(s, actor, action, resource_type, resource_id, before, after)

    def list_audit(
        self, *, limit: int = 100, page_token: str | None = None, resource_type: str | None = None
    ) -> tuple[list[dict], str | None]:
        key = decode_page_token(page_token, int_field)
        with self._tx() as s:
            q = select(AuditRecord).order_by(AuditRecord.id.desc()).limit(limit + 1)
            if resource_type:
                q = q.where(AuditRecord.resource_type == resource_type)
            if key:
                q = q.where(AuditRecord.id < key[0])
            rows = list(s.scalars(q))
        items = [
            {
                "id": r.id,
                "at": _iso(r.at),
                "actor": r.actor,
                "action": r.action,
                "resource_type": r.resource_type,
                "resource_id": r.resource_id,
                "before": r.before,
                "after": r.after,
            }
            for r in rows[:limit]
        ]
        nxt = encode_page_token(rows[limit - 1].id) if len(rows) > limit else None
        return items, nxt

    # -- tokens ----------------------------------------------------------------------------
    def create_token(self, name: str, role: str, actor: str) -> tuple[dict[str, Any], str]:
        """Issue a token; returns (its record, the plaintext). Only the hash is stored."""
        plaintext = "mtk_" + secrets.token_urlsafe(32)
        row = ApiToken(
            id=uuid.uuid4().hex,
            name=name,
            token_sha256=hash_token(plaintext),
            role=role,
            created_by=actor,
            created_at=_now(),
        )
        with self._tx() as s:
            s.add(row)
            s.flush()
            record = {"id": row.id, "name": name, "role": role, "created_at": _iso(row.created_at)}
            self._audit(s, actor, "token.create", "token", row.id, None, record)
        return record, plaintext

    def revoke_token(self, token_id: str, actor: str) -> None:
        with self._tx() as s:
            row = s.get(ApiToken, token_id, with_for_update=True)
            if row is None or row.revoked_at is not None:
                raise NotFound(f"token {token_id!r} does not exist or is revoked already")
            row.revoked_at = _now()
            self._audit(s, actor, "token.revoke", "token", token_id, {"role": row.role}, None)

    def role_for_token(self, plaintext: str) -> tuple[str, str] | None:
        """(role, token name) of a live token, or None."""
        digest = hash_token(plaintext)
        with self._tx() as s:
            row = s.scalars(
                select(ApiToken).where(ApiToken.token_sha256 == digest, ApiToken.revoked_at.is_(None))
            ).first()
            return (row.role, row.name) if row is not None else None


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
