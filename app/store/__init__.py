"""The metadata store: endpoints, jobs, the audit log, API tokens, the trust and approvals of
model versions, the outbox of registry mutations, and the outbox of platform events (each
change's CloudEvents, written in its transaction; see ``app/events``).

SQLite in the local profile, PostgreSQL in production; the same code and the same Alembic
migrations for both. Every mutation writes its audit record in the same transaction, so a
change is never stored without its record (nor the other way round).
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, delete, event, select, text
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from app.errors import Conflict, DependencyUnavailable, InvalidInput, NotFound
from app.redaction import MASK, keep_redacted, redact, redact_value
from app.pagination import decode_page_token, encode_page_token, int_field, str_field, time_field
from app.events import changes as _events
from app.store.models import ApiToken, AuditRecord, Endpoint, Event, Job, ModelApproval, ModelTrust, RegistryOp

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


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def hash_token(token: str) -> str:
    # surrogatepass: a header decoded by the server may hold any code point; hashing never fails
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def redacted_endpoint(endpoint: dict[str, Any]) -> dict[str, Any]:
    """An endpoint as the API sends it back and the audit log keeps it: the values of
    ``config.headers`` (credentials for a remote server, e.g. a Triton ``Authorization``
    header) replaced by ``***`` with the names kept, and the credentials inside URIs of the
    config (``config.url`` with ``user:password@``) hidden by :func:`app.redaction.redact`.
    The credentials themselves live only in the endpoint row, which only the serving path reads."""
    config = endpoint.get("config") or {}
    if not isinstance(config, dict) or not config:
        return endpoint
    config = redact_value(config)
    if isinstance(config.get("headers"), dict):
        config["headers"] = {k: MASK for k in config["headers"]}
    return {**endpoint, "config": config}


class MetadataStore:
    """Facade over the metadata database. Thread-safe; one per process is enough."""

    event_source = "/matih-ml"  # the CloudEvents source of the events it writes (settings.events.source)

    def __init__(
        self, url: str, *, echo: bool = False, connect_timeout_s: int = 10, statement_timeout_s: float = 30.0
    ):
        self.url = url
        kwargs: dict[str, Any] = {"echo": echo, "pool_pre_ping": True, "future": True}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        elif url.startswith("postgresql"):
            # A stalled server fails a call within these bounds instead of hanging the caller.
            kwargs["connect_args"] = {
                "connect_timeout": int(connect_timeout_s),
                "options": f"-c statement_timeout={int(statement_timeout_s * 1000)}",
            }
        self.engine: Engine = create_engine(url, **kwargs)
        if url.startswith("sqlite"):
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self._migrate_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings) -> MetadataStore:
        """The store of ``settings.database_url`` with ``settings.database``'s timeouts."""
        store = cls(
            settings.database_url, connect_timeout_s=settings.database.connect_timeout_s,
            statement_timeout_s=settings.database.statement_timeout_s,
        )
        store.event_source = settings.events.source
        return store

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

    def transaction(self) -> AbstractContextManager[Session]:
        """One transaction on the store's engine (commit on success, rollback on error; an
        unreachable database is DependencyUnavailable): what the stores of other concerns
        (feedback, bandit arms, A/B tests, rollouts) write their rows and audit records in."""
        return self._tx()

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

    def _event(self, session: Session, spec: tuple[str, str, dict[str, Any]] | list | None) -> None:
        """Write the events ``spec`` = (type, subject, data), or a list of them, of
        :mod:`app.events.changes` to the outbox in the change's own transaction: the change and
        its events commit or roll back together, and the EventRelay publishes them afterwards."""
        for type_, subject, data in ([] if spec is None else spec if isinstance(spec, list) else [spec]):
            session.add(Event(event_id=uuid.uuid4().hex, type=type_, source=self.event_source, subject=subject,
                              time=_now(), data=data, attempts=0))
            session.flush()  # numbered in the order written

    # -- endpoints -------------------------------------------------------------------------
    @staticmethod
    def _endpoint_dict(row: Endpoint) -> dict[str, Any]:
        return {
            "name": row.name,
            "target": row.target,
            "runtime": row.runtime,
            "config": row.config or {},
            "spec": row.spec or {},
            "spec_version": row.spec_version or 1,
            "created_by": row.created_by,
            "created_at": _iso(row.created_at),
            "updated_at": _iso(row.updated_at),
        }

    def create_endpoint(
        self, name: str, target: str, runtime: str, config: dict, actor: str, *, model: str | None = None,
        verify: Callable[[], Any] | None = None, spec: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Store an endpoint (``spec``: its :class:`app.serving.routing.EndpointSpec` as a dict). With ``model`` (the target's model name) the row is written under
        that model's guard, as :meth:`begin_model_delete` is: refused while a delete of the model
        is in flight, and ``verify`` (the target resolves in MLflow) runs inside the same
        transaction, so a model deleted meanwhile leaves no endpoint behind."""
        now = _now()
        row = Endpoint(
            name=name, target=target, runtime=runtime, config=config, spec=spec or {}, spec_version=1,
            created_by=actor, created_at=now, updated_at=now,
        )
        try:
            with self._tx() as s:
                if model is not None:
                    self._lock_model(s, model)
                if s.get(Endpoint, name) is not None:
                    raise Conflict(f"endpoint {name!r} exists already; PUT /v1/endpoints/{name} changes it")
                s.add(row)
                s.flush()  # written before the checks: on SQLite this takes the write lock (the guard)
                if model is not None:
                    self._refuse_while_deleting(s, model)
                if verify is not None:
                    verify()
                after = self._endpoint_dict(row)
                self._audit(s, actor, "endpoint.create", "endpoint", name, None, redacted_endpoint(after))
                self._event(s, _events.endpoint_changed("endpoint.created", None, redacted_endpoint(after)))
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

    def update_endpoint(
        self, name: str, changes: dict[str, Any], actor: str, *, model: str | None = None,
        verify: Callable[[], Any] | None = None,
    ) -> dict[str, Any]:
        """Change an endpoint; ``model`` and ``verify`` guard a new target as in :meth:`create_endpoint`."""
        with self._tx() as s:
            if model is not None:
                self._lock_model(s, model)
            row = s.get(Endpoint, name, with_for_update=True)
            if row is None:
                raise NotFound(f"endpoint {name!r} does not exist; POST /v1/endpoints creates it")
            before = self._endpoint_dict(row)
            if isinstance(changes.get("config"), dict):  # a config as GET showed it keeps its credentials
                changes = {**changes, "config": keep_redacted(changes["config"], row.config or {})}
            for field in ("target", "runtime", "config"):
                if field in changes and changes[field] is not None:
                    setattr(row, field, changes[field])
            if changes.get("spec") is not None and changes["spec"] != (row.spec or {}):
                row.spec = changes["spec"]
                row.spec_version = (row.spec_version or 1) + 1
            row.updated_at = _now()
            s.flush()
            if model is not None:
                self._refuse_while_deleting(s, model)
            if verify is not None:
                verify()
            after = self._endpoint_dict(row)
            self._audit(s, actor, "endpoint.update", "endpoint", name, redacted_endpoint(before), redacted_endpoint(after))
            self._event(s, _events.endpoint_changed("endpoint.updated", redacted_endpoint(before), redacted_endpoint(after)))
        return after

    def delete_endpoint(self, name: str, actor: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(Endpoint, name, with_for_update=True)
            if row is None:
                raise NotFound(f"endpoint {name!r} does not exist")
            before = self._endpoint_dict(row)
            s.delete(row)
            self._audit(s, actor, "endpoint.delete", "endpoint", name, redacted_endpoint(before), None)
            self._event(s, _events.endpoint_changed("endpoint.deleted", redacted_endpoint(before), None))
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
            if running_as:  # started by hand: queued and started at once
                self._event(s, _events.job_changed({**after, "status": "queued"}, None))
            self._event(s, _events.job_changed(after, "queued" if running_as else None))
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
                    # a job's error may quote a URL with its password: never stored
                    setattr(row, key, redact_value(fields[key]))
            s.flush()
            out = self._job_dict(row)
            self._audit(s, actor, f"job.{status}", "job", job_id, {"status": before}, {"status": status})
            self._event(s, _events.job_changed(out, before))
        return out

    def update_job_progress(self, job_id: str, progress: dict[str, Any], log: str | None = None) -> None:
        with self._tx() as s:
            row = s.get(Job, job_id, with_for_update=True)
            if row is None:
                raise NotFound(f"job {job_id!r} does not exist")
            row.progress = {**(row.progress or {}), **progress}
            if log:
                row.logs = ((row.logs or "") + redact(log).rstrip("\n") + "\n")[-_MAX_LOG_CHARS:]

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

    def job_counts(self) -> dict[tuple[str, str], int]:
        """Jobs per (kind, status), for the job scheduler's ``matih_jobs`` gauge."""
        from sqlalchemy import func

        with self._tx() as s:
            rows = s.execute(select(Job.kind, Job.status, func.count()).group_by(Job.kind, Job.status))
            return {(kind, status): int(n) for kind, status, n in rows}

    # -- audit -----------------------------------------------------------------------------
    def record_audit(
        self, actor: str, action: str, resource_type: str, resource_id: str, before: Any, after: Any
    ) -> None:
        """Record a mutation whose state lives outside this store (MLflow, Feast): who, what,
        before and after. Changes to this store's own rows are audited in their transaction."""
        with self._tx() as s:
            self._audit(s, actor, action, resource_type, resource_id, before, after)
            self._event(s, _events.audited(action, resource_id, before, after))

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

    # -- model trust and approvals ----------------------------------------------------------
    @staticmethod
    def _trust_dict(row: ModelTrust) -> dict[str, Any]:
        return {"model": row.model, "version": row.version, "sha256": row.sha256, "trusted_by": row.trusted_by,
                "trusted_at": _iso(row.trusted_at)}

    @staticmethod
    def _approval_dict(row: ModelApproval) -> dict[str, Any]:
        return {"model": row.model, "version": row.version, "sha256": row.sha256, "by": row.approved_by,
                "at": _iso(row.approved_at), "comment": row.comment or ""}

    def set_trust(self, model: str, version: str, sha256: str, actor: str) -> dict[str, Any]:
        """Record that ``actor`` trusts the pickle-based file of ``model/version`` whose bytes
        hash to ``sha256`` (replacing an earlier record), with its audit record."""
        with self._tx() as s:
            row = s.get(ModelTrust, (model, str(version)), with_for_update=True)
            before = self._trust_dict(row) if row is not None else None
            if row is None:
                row = ModelTrust(model=model, version=str(version))
                s.add(row)
            row.sha256, row.trusted_by, row.trusted_at = sha256, actor, _now()
            s.flush()
            after = self._trust_dict(row)
            self._audit(s, actor, "model_version.trust", "model_version", f"{model}/{version}", before, after)
        return after

    def get_trust(self, model: str, version: str) -> dict[str, Any] | None:
        with self._tx() as s:
            row = s.get(ModelTrust, (model, str(version)))
            return self._trust_dict(row) if row is not None else None

    def trust_of_model(self, model: str) -> dict[str, dict[str, Any]]:
        """version -> trust record, for every trusted version of ``model``."""
        with self._tx() as s:
            rows = s.scalars(select(ModelTrust).where(ModelTrust.model == model))
            return {r.version: self._trust_dict(r) for r in rows}

    def add_approval(self, model: str, version: str, sha256: str, actor: str, comment: str = "") -> dict[str, Any]:
        """Record ``actor``'s approval of ``model/version`` (model file hashing to ``sha256``) for
        production, with its audit record. Approvals accumulate; the newest is the one shown."""
        with self._tx() as s:
            row = ModelApproval(model=model, version=str(version), sha256=sha256, approved_by=actor,
                                approved_at=_now(), comment=comment or "")
            s.add(row)
            s.flush()
            after = self._approval_dict(row)
            self._audit(s, actor, "model_version.approve", "model_version", f"{model}/{version}", None, after)
        return after

    def approvals(self, model: str, version: str | None = None) -> list[dict[str, Any]]:
        """Approvals of ``model`` (of one version with ``version``), oldest first."""
        with self._tx() as s:
            q = select(ModelApproval).where(ModelApproval.model == model).order_by(ModelApproval.id)
            if version is not None:
                q = q.where(ModelApproval.version == str(version))
            return [self._approval_dict(r) for r in s.scalars(q)]

    # -- the registry outbox -----------------------------------------------------------------
    def _lock_model(self, s: Session, model: str) -> None:
        """Serialize the guarded steps on one model (endpoint creation against model deletion).
        PostgreSQL: an advisory lock held to the end of the transaction. SQLite has one writer
        at a time: the callers write their row before they check, which takes the lock."""
        if self.engine.dialect.name == "postgresql":
            key = int.from_bytes(hashlib.sha256(f"matih-model:{model}".encode()).digest()[:8], "big", signed=True)
            s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": key})

    @staticmethod
    def _refuse_while_deleting(s: Session, model: str) -> None:
        pending = s.scalars(
            select(RegistryOp.id).where(RegistryOp.model == model, RegistryOp.op == "model.delete",
                                        RegistryOp.state == "pending")
        ).first()
        if pending is not None:
            raise Conflict(f"model {model!r} is being deleted; target another model", details={"model": model})

    @staticmethod
    def _op_dict(row: RegistryOp) -> dict[str, Any]:
        return {"id": row.id, "op": row.op, "model": row.model, "version": row.version, "state": row.state,
                "actor": row.actor, "payload": row.payload or {}, "result": row.result, "error": row.error,
                "created_at": _iso(row.created_at), "finished_at": _iso(row.finished_at)}

    def begin_op(self, op: str, model: str, actor: str, payload: dict[str, Any], *, version: str | None = None) -> int:
        """Write the intent of a registry mutation (``pending``) before its MLflow calls; returns
        its id. Refused while a delete of the same model is in flight."""
        with self._tx() as s:
            self._lock_model(s, model)
            row = RegistryOp(op=op, model=model, version=version, state="pending", actor=actor, payload=payload,
                             created_at=_now())
            s.add(row)
            s.flush()
            if op != "model.delete":
                self._refuse_while_deleting(s, model)
            return row.id

    def begin_model_delete(self, model: str, actor: str, payload: dict[str, Any]) -> int:
        """The intent of deleting ``model``, under the model's guard: refused (Conflict naming
        them) while endpoints target it; endpoints created meanwhile wait for this step and
        are refused while the delete is pending (:meth:`create_endpoint`)."""
        from app.registry.targets import parse_target

        with self._tx() as s:
            self._lock_model(s, model)
            row = RegistryOp(op="model.delete", model=model, state="pending", actor=actor, payload=payload,
                             created_at=_now())
            s.add(row)
            s.flush()
            used = []
            for ep_name, target in s.execute(select(Endpoint.name, Endpoint.target)):
                try:
                    if parse_target(target).name == model:
                        used.append(ep_name)
                except InvalidInput:
                    continue
            if used:
                raise Conflict(
                    f"model {model!r} is served by endpoint(s) {', '.join(sorted(used))}; point them elsewhere or "
                    "delete them first",
                    details={"endpoints": sorted(used)},
                )
            return row.id

    def finish_op(
        self, op_id: int, state: str = "done", *, version: str | None = None, result: dict[str, Any] | None = None,
        error: str | None = None, audit: tuple[str, str, str, Any, Any] | None = None,
    ) -> bool:
        """Complete (``done``) or roll back (``rolled_back``) an op; with ``audit`` = (action,
        resource type, resource id, before, after) its audit record is written in the same
        transaction. Only the first completion counts (returns False for the others), so a
        finished op has exactly one audit record whoever finished it. A completed
        ``model.delete`` drops the model's trust and approval records."""
        if state not in ("done", "rolled_back"):
            raise InvalidInput(f"op state {state!r} is not done or rolled_back")
        with self._tx() as s:
            row = s.get(RegistryOp, op_id, with_for_update=True)
            if row is None:
                raise NotFound(f"registry op {op_id} does not exist")
            allowed = {"pending", "rolled_back"} if state == "done" else {"pending"}
            if row.state not in allowed:
                return False
            row.state, row.finished_at = state, _now()
            if version is not None:
                row.version = str(version)
            if result is not None:
                row.result = result
            if error is not None:
                row.error = error[:4000]
            if state == "done" and row.op == "model.delete":
                s.execute(delete(ModelTrust).where(ModelTrust.model == row.model))
                s.execute(delete(ModelApproval).where(ModelApproval.model == row.model))
                for other in s.scalars(
                    select(RegistryOp).where(RegistryOp.model == row.model, RegistryOp.op == "model.delete",
                                             RegistryOp.state == "pending", RegistryOp.id != row.id)
                ):  # an earlier attempt that never heard back from MLflow: this one finished it
                    other.state, other.finished_at, other.error = "rolled_back", _now(), f"superseded by op {row.id}"
            if audit is not None and state == "done":
                action, rtype, rid, before, after = audit
                self._audit(s, row.actor, action, rtype, rid, before, after)
                self._event(s, _events.registry_op_done(row.op, row.model, row.version, row.payload or {}, before, after))
            return True

    def get_op(self, op_id: int) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(RegistryOp, op_id)
            if row is None:
                raise NotFound(f"registry op {op_id} does not exist")
            return self._op_dict(row)

    def pending_ops(self, older_than_s: float = 0.0) -> list[dict[str, Any]]:
        """Ops still ``pending`` that started at least ``older_than_s`` ago, oldest first."""
        with self._tx() as s:
            rows = list(s.scalars(select(RegistryOp).where(RegistryOp.state == "pending").order_by(RegistryOp.id)))
        cutoff = _now().timestamp() - older_than_s
        return [self._op_dict(r) for r in rows if _aware(r.created_at).timestamp() <= cutoff]

    def later_op_done(self, op_id: int, model: str, op: str) -> bool:
        """Whether an ``op`` on ``model`` begun after ``op_id`` has completed (it supersedes this one)."""
        with self._tx() as s:
            return s.scalars(
                select(RegistryOp.id).where(RegistryOp.model == model, RegistryOp.op == op, RegistryOp.id > op_id,
                                            RegistryOp.state == "done")
            ).first() is not None

    # -- tokens ----------------------------------------------------------------------------
    def create_token(
        self, name: str, role: str, actor: str, expires_at: datetime | None = None
    ) -> tuple[dict[str, Any], str]:
        """Issue a token; returns (its record, the plaintext). Only the hash is stored.
        ``expires_at`` (aware or UTC): from then on the token is refused; None = until revoked."""
        plaintext = "mtk_" + secrets.token_urlsafe(32)
        if expires_at is not None and expires_at.tzinfo is None:
            expires_at = expires_at.replace(tzinfo=timezone.utc)
        row = ApiToken(
            id=uuid.uuid4().hex,
            name=name,
            token_sha256=hash_token(plaintext),
            role=role,
            created_by=actor,
            created_at=_now(),
            expires_at=expires_at.timestamp() if expires_at is not None else None,
        )
        with self._tx() as s:
            s.add(row)
            s.flush()
            record = {
                "id": row.id, "name": name, "role": role, "created_at": _iso(row.created_at),
                "expires_at": _iso(expires_at.astimezone(timezone.utc)) if expires_at is not None else None,
            }
            self._audit(s, actor, "token.create", "token", row.id, None, record)
        return record, plaintext

    def revoke_token(self, token_id: str, actor: str) -> None:
        with self._tx() as s:
            row = s.get(ApiToken, token_id, with_for_update=True)
            if row is None or row.revoked_at is not None:
                raise NotFound(f"token {token_id!r} does not exist or is revoked already")
            row.revoked_at = _now()
            self._audit(s, actor, "token.revoke", "token", token_id, {"role": row.role}, None)

    def role_for_token(self, plaintext: str) -> tuple[str, str, float | None] | None:
        """(role, token name, expiry as a Unix time or None) of a live token: not revoked and
        not expired; else None."""
        digest = hash_token(plaintext)
        with self._tx() as s:
            row = s.scalars(
                select(ApiToken).where(ApiToken.token_sha256 == digest, ApiToken.revoked_at.is_(None))
            ).first()
            if row is None or (row.expires_at is not None and row.expires_at <= time.time()):
                return None
            return row.role, row.name, row.expires_at


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()
