"""SQLAlchemy tables of the metadata store. Schema changes go through Alembic migrations
in ``app/store/migrations/versions``; never edit a released migration."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, Boolean, DateTime, Float, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class Endpoint(Base):
    """A named serving target. Changing a row never redeploys the Serve application."""

    __tablename__ = "endpoints"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    target: Mapped[str] = mapped_column(String(512))
    runtime: Mapped[str] = mapped_column(String(32), default="onnx")
    config: Mapped[dict] = mapped_column(JSON, default=dict)
    # How the endpoint routes and records traffic (app.serving.routing.EndpointSpec), apart from
    # ``config`` (the runtime's, part of the multiplexed model id: changing it reloads models).
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    spec_version: Mapped[int] = mapped_column(Integer, default=1)  # +1 on every change of the spec
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Job(Base):
    """Long work: training, tuning, batch prediction, materialization. Idempotent by ``id``."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(256))
    status: Mapped[str] = mapped_column(String(16), index=True)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    spec: Mapped[dict] = mapped_column(JSON)
    result: Mapped[dict] = mapped_column(JSON, default=dict)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    logs: Mapped[str] = mapped_column(Text, default="")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    ray_job_id: Mapped[str | None] = mapped_column(String(128), nullable=True)  # the Ray Job running it
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_jobs_queue", "status", "priority", "created_at"),)


class AuditRecord(Base):
    """Who did what, when, with the state before and after."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    resource_type: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(256))
    before: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    after: Mapped[dict | None] = mapped_column(JSON, nullable=True)


class ApiToken(Base):
    """A bearer token issued by an admin. Only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class ModelTrust(Base):
    """An admin vouched for the pickle-based file of a model version whose bytes hash to
    ``sha256``: the only thing that lets the platform unpickle it (MLflow tags do not)."""

    __tablename__ = "model_trust"

    model: Mapped[str] = mapped_column(String(128), primary_key=True)
    version: Mapped[str] = mapped_column(String(16), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64))
    trusted_by: Mapped[str] = mapped_column(String(128))
    trusted_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ModelApproval(Base):
    """An admin approved a model version (whose model file hashes to ``sha256``) for production."""

    __tablename__ = "model_approvals"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64))
    approved_by: Mapped[str] = mapped_column(String(128))
    approved_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    comment: Mapped[str] = mapped_column(Text, default="")

    __table_args__ = (Index("ix_model_approvals_version", "model", "version"),)


class RegistryOp(Base):
    """The outbox of registry mutations that touch MLflow: written (``pending``) before the
    MLflow calls, completed (``done``, with its audit record in the same transaction) after
    them, or ``rolled_back``; what a crash leaves ``pending`` is finished or rolled back by
    :func:`app.registry.outbox.recover`."""

    __tablename__ = "registry_ops"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String(32))  # model_version.create | model_version.stage | model.delete
    model: Mapped[str] = mapped_column(String(128))
    version: Mapped[str | None] = mapped_column(String(16), nullable=True)
    state: Mapped[str] = mapped_column(String(16), index=True)  # pending | done | rolled_back
    actor: Mapped[str] = mapped_column(String(128))
    payload: Mapped[dict] = mapped_column(JSON, default=dict)
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_registry_ops_model", "model", "state"),)


class Feedback(Base):
    """Ground truth, a value or a reward for one logged prediction (``request_id``, ``instance``:
    the row of the request). Append-only: a later submission for the same prediction is a new
    row that supersedes the earlier one, so every value given stays on record."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    endpoint: Mapped[str] = mapped_column(String(128))
    request_id: Mapped[str] = mapped_column(String(64))
    instance: Mapped[int] = mapped_column(Integer, default=0)
    label: Mapped[object | None] = mapped_column(JSON, nullable=True)
    value: Mapped[float | None] = mapped_column(Float, nullable=True)
    reward: Mapped[float | None] = mapped_column(Float, nullable=True)
    # The traffic variant that served the prediction (from the prediction log when the feedback
    # arrived; None when the endpoint had one leg or the record was not found).
    variant: Mapped[str | None] = mapped_column(String(128), nullable=True)
    timestamp: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # when the outcome happened
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    actor: Mapped[str] = mapped_column(String(128))

    __table_args__ = (Index("ix_feedback_request", "endpoint", "request_id", "instance", "id"),)


class Event(Base):
    """The outbox of platform events (CloudEvents 1.0), written in the transaction of the change
    they describe and published by the EventRelay; ``id`` is the global order."""

    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)  # the CloudEvents id
    type: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(256))
    subject: Mapped[str] = mapped_column(String(256))
    time: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    data: Mapped[dict] = mapped_column(JSON, default=dict)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)

    __table_args__ = (Index("ix_events_unpublished", "published_at", "id"),)


class BanditArm(Base):
    """The rewards one traffic variant of an endpoint has earned (the current outcome of each
    prediction counts once: a superseding feedback row moves the sums by the difference). The
    bandit strategies' posteriors are computed from these sums; every Gateway replica reads them."""

    __tablename__ = "bandit_arms"

    endpoint: Mapped[str] = mapped_column(String(128), primary_key=True)
    variant: Mapped[str] = mapped_column(String(128), primary_key=True)
    n: Mapped[int] = mapped_column(Integer, default=0)
    reward_sum: Mapped[float] = mapped_column(Float, default=0.0)
    reward_sq_sum: Mapped[float] = mapped_column(Float, default=0.0)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ABTest(Base):
    """An A/B test on an endpoint's traffic plan (``spec``: app.experiments.spec.ABTestSpec)."""

    __tablename__ = "abtests"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128))
    endpoint: Mapped[str] = mapped_column(String(128))
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16))  # running | stopped
    result: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # the last analysis' verdict
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    stopped_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_abtests_endpoint", "endpoint", "status"),)


class Rollout(Base):
    """A canary rollout of ``candidate`` over ``baseline`` (versions of ``model``) on an endpoint.
    ``step`` is the index of the current step in ``spec["steps"]``; ``decisions`` the judged
    steps in order, each with the statistics that drove it. The RolloutController resumes from
    this row after a restart."""

    __tablename__ = "rollouts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(128))
    model: Mapped[str] = mapped_column(String(256))
    baseline: Mapped[str] = mapped_column(String(64))
    candidate: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16))
    step: Mapped[int] = mapped_column(Integer, default=0)
    step_started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    decisions: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_rollouts_endpoint", "endpoint", "status"),)


class Monitor(Base):
    """An endpoint's monitor (``spec``: app.monitoring.spec.MonitorSpec). ``next_run_at`` is
    when the DriftMonitor queues its next scheduled run (null: no schedule)."""

    __tablename__ = "monitors"

    endpoint: Mapped[str] = mapped_column(String(128), primary_key=True)
    spec: Mapped[dict] = mapped_column(JSON, default=dict)
    spec_version: Mapped[int] = mapped_column(Integer, default=1)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_run_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    last_run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class MonitorRun(Base):
    """One run of a monitor over a window of the prediction log: the drift result (dataset,
    columns, prediction, segments), performance and its estimate, and the alerts it raised."""

    __tablename__ = "monitor_runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)  # sorts by creation time
    endpoint: Mapped[str] = mapped_column(String(128))
    status: Mapped[str] = mapped_column(String(16))  # queued | running | succeeded | failed
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | manual
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    spec_version: Mapped[int] = mapped_column(Integer, default=1)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    model_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    window_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    window_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    drift_detected: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    drift: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    performance: Mapped[dict | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_by: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_monitor_runs_endpoint", "endpoint", "created_at"),)


class Alert(Base):
    """An alert: one rule of a monitor firing. ``fingerprint`` (endpoint + rule) de-duplicates:
    while an alert of that fingerprint is open (firing or acknowledged), a rule that fires again
    counts on it instead of opening another."""

    __tablename__ = "alerts"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(128))
    rule: Mapped[str] = mapped_column(String(128))
    fingerprint: Mapped[str] = mapped_column(String(64))
    severity: Mapped[str] = mapped_column(String(16))  # info | warning | critical
    status: Mapped[str] = mapped_column(String(16))  # firing | acknowledged | resolved
    metric: Mapped[str] = mapped_column(String(256))
    value: Mapped[dict | None] = mapped_column(JSON, nullable=True)  # {"value": ..., "threshold": ..., ...}
    message: Mapped[str] = mapped_column(Text)
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    fire_count: Mapped[int] = mapped_column(Integer, default=1)
    first_fired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_fired_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    notified_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deliveries: Mapped[list] = mapped_column(JSON, default=list)  # per channel: attempts, outcome, error
    acked_by: Mapped[str | None] = mapped_column(String(128), nullable=True)
    acked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    resolved_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        Index("ix_alerts_endpoint", "endpoint", "status"),
        Index("ix_alerts_fingerprint", "fingerprint", "status"),
    )


class RetrainTrigger(Base):
    """One retraining trigger of a monitor's policy and the chain it set off: training job ->
    gates -> challenger -> canary rollout -> promoted or rolled back. ``id`` is the trigger's
    own (idempotency key: the job it submits is ``retrain-<id>``); ``steps`` the chain so far,
    each step with its time."""

    __tablename__ = "retrain_triggers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    endpoint: Mapped[str] = mapped_column(String(128))
    policy: Mapped[str] = mapped_column(String(32))  # drift | performance | schedule | labels | manual
    reason: Mapped[dict] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(16))
    run_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    job_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    model: Mapped[str | None] = mapped_column(String(256), nullable=True)
    champion_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    candidate_version: Mapped[str | None] = mapped_column(String(64), nullable=True)
    rollout_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    steps: Mapped[list] = mapped_column(JSON, default=list)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_retrain_triggers_endpoint", "endpoint", "status"),)
