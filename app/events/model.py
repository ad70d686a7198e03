"""The one event model: CloudEvents 1.0 in its JSON format (https://cloudevents.io,
``spec.md`` and ``formats/json-format.md`` of cloudevents/spec v1.0.2), and the catalogue of
event types the platform emits.

Catalogue (``type`` -> ``subject``):

- ``training.job.{queued,started,succeeded,failed,cancelled}`` -> ``jobs/<id>``; jobs of
  other kinds use their own prefix (:func:`job_event_type`): ``batch.job.*`` for batch
  prediction. ``queued`` follows a submission and every retry (a retry re-queues the same id).
- ``model.version.{registered,stage_changed,alias_changed}`` -> ``models/<name>/versions/<v>``
- ``endpoint.{created,updated,deleted}`` -> ``endpoints/<name>``
- ``rollout.{started,step_passed,promoted,rolled_back,paused,resumed,aborted,failed}`` ->
  ``rollouts/<id>`` (canary rollouts, ``app/rollouts``; each decision's statistics in ``data``)
- ``abtest.{created,stopped}`` -> ``abtests/<id>`` (A/B tests, ``app/experiments``)
- ``monitor.{updated,deleted}`` -> ``monitors/<endpoint>``; ``monitor.run.{succeeded,failed}``
  -> ``monitors/<endpoint>/runs/<id>`` (a drift and performance run, ``app/monitoring``; its
  ``monitor_run`` job also raises ``monitor.job.*``)
- ``alert.{fired,acknowledged,resolved}`` -> ``alerts/<id>`` (a monitor's alert rule)
- ``retrain.{triggered,skipped,training,gated,challenger,rollout_started,promoted,rolled_back,failed}``
  -> ``monitors/<endpoint>/triggers/<id>`` (the closed loop: a retraining trigger and each
  step of its chain)

Order is per subject: events of one subject are published in the order their changes
committed (Kafka: the subject is the message key, so they share a partition).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

SPECVERSION = "1.0"
DATACONTENTTYPE = "application/json"

JOB_QUEUED, JOB_STARTED, JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED = (
    "queued", "started", "succeeded", "failed", "cancelled")
TRAINING_JOB_QUEUED = "training.job.queued"
TRAINING_JOB_STARTED = "training.job.started"
TRAINING_JOB_SUCCEEDED = "training.job.succeeded"
TRAINING_JOB_FAILED = "training.job.failed"
TRAINING_JOB_CANCELLED = "training.job.cancelled"
BATCH_JOB_QUEUED = "batch.job.queued"
BATCH_JOB_STARTED = "batch.job.started"
BATCH_JOB_SUCCEEDED = "batch.job.succeeded"
BATCH_JOB_FAILED = "batch.job.failed"
BATCH_JOB_CANCELLED = "batch.job.cancelled"
MODEL_VERSION_REGISTERED = "model.version.registered"
MODEL_VERSION_STAGE_CHANGED = "model.version.stage_changed"
MODEL_VERSION_ALIAS_CHANGED = "model.version.alias_changed"
ENDPOINT_CREATED = "endpoint.created"
ENDPOINT_UPDATED = "endpoint.updated"
ENDPOINT_DELETED = "endpoint.deleted"
ROLLOUT_STARTED = "rollout.started"
ROLLOUT_STEP_PASSED = "rollout.step_passed"
ROLLOUT_PROMOTED = "rollout.promoted"
ROLLOUT_ROLLED_BACK = "rollout.rolled_back"
ROLLOUT_PAUSED = "rollout.paused"
ROLLOUT_RESUMED = "rollout.resumed"
ROLLOUT_ABORTED = "rollout.aborted"
ROLLOUT_FAILED = "rollout.failed"  # it could not go on (its endpoint deleted, a version gone)
ABTEST_CREATED = "abtest.created"
ABTEST_STOPPED = "abtest.stopped"
MONITOR_UPDATED = "monitor.updated"
MONITOR_DELETED = "monitor.deleted"
MONITOR_RUN_SUCCEEDED = "monitor.run.succeeded"
MONITOR_RUN_FAILED = "monitor.run.failed"
ALERT_FIRED = "alert.fired"
ALERT_ACKNOWLEDGED = "alert.acknowledged"
ALERT_RESOLVED = "alert.resolved"
RETRAIN_STEPS = ("triggered", "skipped", "training", "gated", "challenger", "rollout_started", "promoted",
                 "rolled_back", "failed")
RETRAIN_EVENTS = tuple(f"retrain.{step}" for step in RETRAIN_STEPS)

EVENT_TYPES: tuple[str, ...] = (
    TRAINING_JOB_QUEUED, TRAINING_JOB_STARTED, TRAINING_JOB_SUCCEEDED, TRAINING_JOB_FAILED, TRAINING_JOB_CANCELLED,
    BATCH_JOB_QUEUED, BATCH_JOB_STARTED, BATCH_JOB_SUCCEEDED, BATCH_JOB_FAILED, BATCH_JOB_CANCELLED,
    MODEL_VERSION_REGISTERED, MODEL_VERSION_STAGE_CHANGED, MODEL_VERSION_ALIAS_CHANGED,
    ENDPOINT_CREATED, ENDPOINT_UPDATED, ENDPOINT_DELETED,
    ROLLOUT_STARTED, ROLLOUT_STEP_PASSED, ROLLOUT_PROMOTED, ROLLOUT_ROLLED_BACK, ROLLOUT_PAUSED, ROLLOUT_RESUMED,
    ROLLOUT_ABORTED, ROLLOUT_FAILED, ABTEST_CREATED, ABTEST_STOPPED,
    MONITOR_UPDATED, MONITOR_DELETED, MONITOR_RUN_SUCCEEDED, MONITOR_RUN_FAILED,
    ALERT_FIRED, ALERT_ACKNOWLEDGED, ALERT_RESOLVED, *RETRAIN_EVENTS,
)

# A job's kind (app.jobs.run.KINDS) -> the prefix of its events; an unknown kind uses its own name.
_JOB_PREFIX = {"training": "training", "batch_prediction": "batch", "monitor_run": "monitor"}
# A job's new status -> the event it raises ("running" is "started": the job began an attempt).
_JOB_EVENT = {"queued": JOB_QUEUED, "running": JOB_STARTED, "succeeded": JOB_SUCCEEDED, "failed": JOB_FAILED,
              "cancelled": JOB_CANCELLED}


def job_event_type(kind: str, status: str) -> str:
    """The event type of a job of ``kind`` entering ``status``: ``training.job.started`` for a
    training job now running, ``batch.job.failed`` for a failed batch prediction."""
    return f"{_JOB_PREFIX.get(kind, kind)}.job.{_JOB_EVENT[status]}"


def job_subject(job_id: str) -> str:
    return f"jobs/{job_id}"


def model_version_subject(name: str, version: str | int) -> str:
    return f"models/{name}/versions/{version}"


def endpoint_subject(name: str) -> str:
    return f"endpoints/{name}"


def rollout_subject(rollout_id: str) -> str:
    return f"rollouts/{rollout_id}"


def monitor_subject(endpoint: str) -> str:
    return f"monitors/{endpoint}"


def monitor_run_subject(endpoint: str, run_id: str) -> str:
    return f"monitors/{endpoint}/runs/{run_id}"


def alert_subject(alert_id: str) -> str:
    return f"alerts/{alert_id}"


def retrain_subject(endpoint: str, trigger_id: str) -> str:
    return f"monitors/{endpoint}/triggers/{trigger_id}"


def new_event_id() -> str:
    return uuid.uuid4().hex


def rfc3339(value: datetime) -> str:
    """``value`` (aware, or naive meaning UTC as SQLite returns it) in RFC 3339 with a ``Z``."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


@dataclass(frozen=True)
class CloudEvent:
    """One platform event. ``sequence`` is the outbox position (the global order of commits as
    the outbox numbered them); it travels as the ``sequence`` extension attribute (a string, as
    the CloudEvents sequence extension has it) and is what ``GET /v1/events?since=`` takes."""

    id: str
    source: str
    type: str
    subject: str
    time: datetime
    data: dict[str, Any] = field(default_factory=dict)
    sequence: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The structured-mode JSON form (``application/cloudevents+json``)."""
        out: dict[str, Any] = {
            "specversion": SPECVERSION,
            "id": self.id,
            "source": self.source,
            "type": self.type,
            "subject": self.subject,
            "time": rfc3339(self.time),
            "datacontenttype": DATACONTENTTYPE,
            "data": self.data,
        }
        if self.sequence is not None:
            out["sequence"] = str(self.sequence)
        return out

    @classmethod
    def from_row(cls, row) -> CloudEvent:
        """The event of an outbox row (``app.store.models.Event``)."""
        return cls(id=row.event_id, source=row.source, type=row.type, subject=row.subject, time=row.time,
                   data=row.data or {}, sequence=row.id)
