"""The closed loop: retraining policies, and the chain a trigger sets off with no human step.

A monitor run's outputs (``drift.dataset``, ``performance.<metric>``, ``labels.new``) or the
clock (``schedule``) fire a policy of the endpoint's :class:`RetrainingSpec`; the trigger then
moves, one compare-and-set transaction per step, through

    pending -> training -> challenger -> rolling_out -> promoted | rolled_back
                        -> gated  (the job's validation gates kept the champion)
    pending -> skipped  (too few labelled rows); any open step -> failed (it could not go on)

- ``pending``: recorded, nothing submitted yet. :meth:`RetrainLoop.start` builds the dataset
  (the window's logged inputs joined with their labels, plus the champion's own training set)
  as one parquet file, and submits a training job derived from the champion's own job spec:
  same estimator and hyperparameters, new data, ``validation.compare_with = champion``,
  ``alias_on_pass = challenger``. The job id is ``retrain-<trigger id>``: submitting twice
  (a DriftMonitor that died between the two writes) finds the same job.
- ``training``: the job runs (the JobScheduler admits it like any job). It fails with
  ``validation_failed`` when its gates do not pass against the champion: ``gated``, the end.
- ``challenger``: the job registered a version with the ``challenger`` alias; a canary rollout
  of it is created (:class:`app.rollouts.controller.RolloutController`), ``rolling_out``.
- ``rolling_out``: the RolloutController judges the steps and promotes or rolls back; the
  trigger follows the rollout's end.

Each move writes the row's new status and an appended step (``{"step", "at", "detail"}``),
an audit record and a ``retrain.<step>`` event in ONE transaction, and only if the row still
holds the status it was read with: two DriftMonitors (or one restarted) never move a trigger
twice. The steps a firing policy could not take (cooldown, ``max_concurrent``) are recorded as
``skipped`` triggers with their reason, once per run and policy (the ids are idempotent), so
``GET /v1/monitors/{endpoint}/loop`` shows why nothing was retrained.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import uuid
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from sqlalchemy import String, cast, func, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.errors import Conflict, DependencyUnavailable, InvalidInput, MatihError, NotFound
from app.events import model as m
from app.pagination import decode_page_token, encode_page_token, str_field, time_field
from app.store import MetadataStore
from app.store.models import Feedback, RetrainTrigger

__all__ = [
    "RetrainPolicy", "RetrainData", "RetrainingSpec", "RetrainLoop", "TRIGGER_STATUSES", "OPEN_STATUSES",
    "LOOP_ACTOR", "build_job_spec", "trigger_dict",
]

log = logging.getLogger(__name__)

LOOP_ACTOR = "drift-monitor"  # the audit actor of the loop's own moves
TRIGGER_STATUSES = ("pending", "skipped", "training", "gated", "challenger", "rolling_out", "promoted",
                    "rolled_back", "failed")
OPEN_STATUSES = ("pending", "training", "challenger", "rolling_out")
ENDED_STATUSES = ("skipped", "gated", "promoted", "rolled_back", "failed")
# A trigger's status -> the step (and event ``retrain.<step>``) that moved it there.
_STEP_OF = {"pending": "triggered", "skipped": "skipped", "training": "training", "gated": "gated",
            "challenger": "challenger", "rolling_out": "rollout_started", "promoted": "promoted",
            "rolled_back": "rolled_back", "failed": "failed"}
_ROLLOUT_FORBIDDEN = ("endpoint", "candidate", "baseline")
_ID_CHARS = 55  # a trigger id fits the jobs table's 64 characters with the "retrain-" prefix


# -- specs ------------------------------------------------------------------------------------------
class RetrainPolicy(BaseModel):
    """When to retrain. One spec may hold several; each fires on its own."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["drift", "performance", "schedule", "labels"] = Field(
        ..., description="drift: the run found dataset drift (drift.dataset); performance: a measured metric "
        "fell below `below`; schedule: every `every_s` seconds; labels: `rows` new labelled rows arrived since "
        "the last trigger.",
    )
    metric: str = Field(
        "accuracy", min_length=1, max_length=64,
        description="performance: the measured metric, as a run's outputs name it (performance.<metric>).",
    )
    below: float | None = Field(
        None, description="performance (required): fire when the measured metric is below this.",
    )
    every_s: float | None = Field(
        None, gt=0, description="schedule (required): seconds between two scheduled retrainings.",
    )
    rows: int | None = Field(
        None, ge=1, description="labels (required): fire when at least this many new labelled rows arrived "
        "since the endpoint's last trigger.",
    )

    @model_validator(mode="after")
    def _required(self) -> RetrainPolicy:
        need = {"performance": "below", "schedule": "every_s", "labels": "rows"}.get(self.kind)
        if need is not None and getattr(self, need) is None:
            raise ValueError(f"a {self.kind} policy needs `{need}`")
        if self.below is not None and not math.isfinite(self.below):
            raise ValueError("`below` must be a finite number")
        return self


class RetrainData(BaseModel):
    """What a retraining job trains on."""

    model_config = ConfigDict(extra="forbid")

    window_days: float = Field(
        30.0, gt=0, le=3650, description="The logged inputs of the last this many days, joined with their labels "
        "(feedback), are the new data.",
    )
    include_training_set: bool = Field(
        True, description="Add the champion's original training set (its job spec's dataset.uri) to the new data.",
    )
    min_rows: int = Field(
        50, ge=1, description="Fewer labelled rows in the window: the trigger is skipped, saying why.",
    )


class RetrainingSpec(BaseModel):
    """A monitor's retraining: the policies that fire it and how the chain runs."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="Off: no policy fires (manual triggers still run).")
    policies: list[RetrainPolicy] = Field(
        default_factory=list, description="When to retrain; each fires on its own (none: manual triggers only).",
    )
    cooldown_s: float = Field(
        3600.0, ge=0, description="No new trigger within this many seconds of the endpoint's last one (skipped "
        "triggers do not count).",
    )
    max_concurrent: int = Field(
        1, ge=1, le=100, description="Open triggers (pending, training, challenger, rolling out) per endpoint.",
    )
    data: RetrainData = Field(default_factory=RetrainData, description="The retraining dataset.")
    rollout: dict[str, Any] = Field(
        default_factory=dict, description="The canary rollout of the challenger: RolloutSpec fields but endpoint, "
        "candidate and baseline (steps, bake_s, min_samples, quality, ...).",
    )
    training: dict[str, Any] = Field(
        default_factory=dict, description="A deep-merge overlay on the champion's job spec, e.g. "
        "{\"validation\": {\"gates\": [{\"metric\": \"accuracy\", \"beat_champion_by\": 0.0}]}}.",
    )
    job_spec: dict[str, Any] | None = Field(
        None, description="A full training job spec to use instead of the champion's (for a champion not trained "
        "by a job, e.g. an uploaded model); its dataset.uri is still replaced by the retraining data.",
    )

    @field_validator("rollout")
    @classmethod
    def _rollout(cls, value: dict[str, Any]) -> dict[str, Any]:
        from app.rollouts.spec import RolloutSpec

        bad = [k for k in _ROLLOUT_FORBIDDEN if k in value]
        if bad:
            raise ValueError(f"rollout takes no {', '.join(bad)}: the loop sets them (the monitor's endpoint, the "
                             "challenger, the version the endpoint serves)")
        try:
            RolloutSpec.model_validate({"endpoint": "e", "candidate": "2", **value})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "rollout"
            raise ValueError(f"rollout.{where}: {first['msg']}") from None
        return value


# -- helpers ----------------------------------------------------------------------------------------
def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else _aware(value).isoformat()


def _bounded(trigger_id: str) -> str:
    """A trigger id short enough for its job id (``retrain-<id>`` in 64 characters): a long one
    keeps its head and gets a hash of the whole for a tail, so it stays unique and repeatable."""
    if len(trigger_id) <= _ID_CHARS:
        return trigger_id
    digest = hashlib.sha256(trigger_id.encode()).hexdigest()[:16]
    return f"{trigger_id[:_ID_CHARS - 17]}-{digest}"


def _deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """``overlay`` on ``base``: nested mappings merge, anything else (lists included) replaces."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_job_spec(base: dict[str, Any], overlay: dict[str, Any], *, dataset_uri: str, model: str,
                   endpoint: str) -> dict[str, Any]:
    """The retraining job's spec: ``base`` (the champion's job spec, or ``job_spec``) with the
    ``training`` overlay merged, the new dataset, and the loop's fixed parts: registered as the
    endpoint's model, compared with its champion, a passing version aliased ``challenger``.
    Raises InvalidInput naming the field when the result is not a valid TrainingJobSpec."""
    from app.training.spec import TrainingJobSpec

    spec = _deep_merge(base, overlay)
    dataset = dict(spec.get("dataset") or {})
    dataset["uri"] = dataset_uri
    spec["dataset"] = dataset
    validation = dict(spec.get("validation") or {})
    validation.update({"compare_with": "champion", "alias_on_pass": "challenger"})
    spec["validation"] = validation
    spec["register_as"] = model
    spec["name"] = f"retrain-{endpoint}"[:128]
    if isinstance(spec.get("checkpoint"), dict):
        spec["checkpoint"] = {k: v for k, v in spec["checkpoint"].items() if k != "resume_from"}
    try:
        return TrainingJobSpec.model_validate(spec).model_dump(mode="json")
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(spec)"
        raise InvalidInput(f"the retraining job spec is not valid at {where}: {first['msg']}; fix the monitor's "
                           "retraining.training overlay or retraining.job_spec",
                           details={"field": f"retraining.training.{where}"}) from None


def trigger_dict(row: RetrainTrigger) -> dict[str, Any]:
    """A trigger as the API shows it: its chain with each step's seconds since the trigger."""
    created = _aware(row.created_at)
    reason = dict(row.reason or {})
    spec = reason.pop("retraining", None)
    steps = []
    for step in row.steps or []:
        at = step.get("at")
        after = (datetime.fromisoformat(at) - created).total_seconds() if at else None
        steps.append({**step, "after_s": None if after is None else round(after, 3)})
    end = _aware(row.finished_at) if row.finished_at is not None else None
    return {
        "id": row.id, "endpoint": row.endpoint, "policy": row.policy, "status": row.status, "reason": reason,
        "run_id": row.run_id, "job_id": row.job_id, "model": row.model, "champion_version": row.champion_version,
        "candidate_version": row.candidate_version, "rollout_id": row.rollout_id, "steps": steps,
        "error": row.error, "created_at": _iso(row.created_at), "updated_at": _iso(row.updated_at),
        "finished_at": _iso(row.finished_at),
        "duration_s": None if end is None else round((end - created).total_seconds(), 3),
        "spec": spec,
    }


def _event_data(t: dict[str, Any], previous: str | None, detail: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "endpoint", "policy", "status", "run_id", "job_id", "model", "champion_version",
            "candidate_version", "rollout_id", "error")
    data = {k: t.get(k) for k in keys}
    data["trigger_id"] = data.pop("id")
    data["previous_status"] = previous
    data["reason"] = t.get("reason")
    data["detail"] = detail
    return data


# -- the loop ---------------------------------------------------------------------------------------
class RetrainLoop:
    """Plain Python over the metadata store, the registry service, the prediction log and the
    rollouts; the DriftMonitor actor calls :meth:`evaluate` after each run and :meth:`advance`
    on its timer, the API :meth:`chain` and :meth:`trigger_manual`.

    ``registry``: the :class:`app.registry.service.RegistryService`; ``clock``: now, as an aware
    datetime; ``notify``: passed to the RolloutController (announces the changed endpoint)."""

    def __init__(self, store: MetadataStore, settings, registry, clock: Callable[[], datetime] | None = None, *,
                 notify: Callable[[str], Any] | None = None):
        self.store = store
        self.settings = settings
        self.registry = registry
        self.clock = clock or _utc_now
        self.notify = notify

    def _tx(self) -> AbstractContextManager[Session]:
        return self.store.transaction()

    def _rollouts(self):
        from app.rollouts.controller import RolloutController

        return RolloutController(self.store, self.settings, self.registry, self.clock, notify=self.notify)

    # -- reading ------------------------------------------------------------------------------------
    def get(self, trigger_id: str) -> dict[str, Any]:
        with self._tx() as s:
            row = s.get(RetrainTrigger, trigger_id)
            if row is None:
                raise NotFound(f"retraining trigger {trigger_id!r} does not exist; GET /v1/monitors/<endpoint>/loop "
                               "lists them")
            return trigger_dict(row)

    def chain(self, endpoint: str, limit: int = 50, page_token: str | None = None
              ) -> tuple[list[dict[str, Any]], str | None]:
        """The endpoint's triggers, newest first, each with its steps and their timings."""
        key = decode_page_token(page_token, time_field, str_field)
        with self._tx() as s:
            q = (select(RetrainTrigger).where(RetrainTrigger.endpoint == endpoint)
                 .order_by(RetrainTrigger.created_at.desc(), RetrainTrigger.id.desc()).limit(limit + 1))
            if key:
                at, tid = key
                q = q.where((RetrainTrigger.created_at < at)
                            | ((RetrainTrigger.created_at == at) & (RetrainTrigger.id < tid)))
            rows = list(s.scalars(q))
            items = [trigger_dict(r) for r in rows[:limit]]
            nxt = encode_page_token(rows[limit - 1].created_at.isoformat(), rows[limit - 1].id) \
                if len(rows) > limit else None
        return items, nxt

    def _last_started(self, s: Session, endpoint: str, policy: str | None = None) -> datetime | None:
        """When the endpoint's last trigger that was not skipped was made (of ``policy``)."""
        q = select(func.max(RetrainTrigger.created_at)).where(RetrainTrigger.endpoint == endpoint,
                                                             RetrainTrigger.status != "skipped")
        if policy is not None:
            q = q.where(RetrainTrigger.policy == policy)
        at = s.scalar(q)
        return None if at is None else _aware(at)

    def new_labels(self, endpoint: str) -> int:
        """Labelled predictions (feedback with a label or a value) received since the endpoint's
        last trigger (all of them when there was none): what a ``labels`` policy counts."""
        with self._tx() as s:
            since = self._last_started(s, endpoint)
            # A label given as None is stored as JSON null, not SQL NULL: compared as text, portably.
            has_label = func.coalesce(cast(Feedback.label, String), "null") != "null"
            keys = select(Feedback.request_id, Feedback.instance).where(
                Feedback.endpoint == endpoint, has_label | Feedback.value.is_not(None))
            if since is not None:
                keys = keys.where(Feedback.received_at >= since)
            q = select(func.count()).select_from(keys.distinct().subquery())
            return int(s.scalar(q) or 0)

    # -- firing -------------------------------------------------------------------------------------
    def evaluate(self, endpoint: str, spec: RetrainingSpec | dict[str, Any], outputs: dict[str, Any] | None,
                 run_id: str | None, now: datetime | None = None) -> list[dict[str, Any]]:
        """The policies that fire for this run's ``outputs`` (``drift.dataset``,
        ``performance.<metric>``, ``labels.new``; computed from the feedback table when absent)
        and the schedule policies now due; returns the triggers created. Without ``run_id`` only
        schedule policies are looked at (the DriftMonitor's tick). Idempotent: a run's triggers
        are ``<run_id>-<kind>``, a schedule's ``sched-<endpoint>-<slot>``; evaluating again
        creates nothing. A firing policy that cooldown or max_concurrent holds back is recorded
        as a ``skipped`` trigger with the reason."""
        spec = spec if isinstance(spec, RetrainingSpec) else RetrainingSpec.model_validate(spec)
        if not spec.enabled:
            return []
        now = _aware(now or self.clock())
        outputs = outputs or {}
        created = []
        for policy in spec.policies:
            fired = self._fires(endpoint, policy, outputs, run_id, now)
            if fired is None:
                continue
            trigger_id, reason = fired
            row = self._create(trigger_id, endpoint, policy.kind, reason, spec, run_id=run_id, now=now,
                               actor=LOOP_ACTOR, enforce_cooldown=True)
            if row is not None:
                created.append(row)
        return created

    def _fires(self, endpoint: str, policy: RetrainPolicy, outputs: dict[str, Any], run_id: str | None,
               now: datetime) -> tuple[str, dict[str, Any]] | None:
        if policy.kind == "schedule":
            slot = math.floor(now.timestamp() / policy.every_s)
            with self._tx() as s:
                last = self._last_started(s, endpoint, "schedule")
            if last is not None and (now - last).total_seconds() < policy.every_s:
                return None
            return (_bounded(f"sched-{endpoint}-{slot}"),
                    {"why": f"scheduled every {policy.every_s:g} s", "last_scheduled": _iso(last), "slot": slot})
        if run_id is None:
            return None
        trigger_id = _bounded(f"{run_id}-{policy.kind}")
        if policy.kind == "drift":
            if outputs.get("drift.dataset") is not True:
                return None
            values = {k: v for k, v in outputs.items() if k.startswith("drift.")}
            return trigger_id, {"why": "dataset drift detected", "values": values}
        if policy.kind == "performance":
            name = f"performance.{policy.metric}"
            value = outputs.get(name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                return None
            if not value < policy.below:
                return None
            return trigger_id, {"why": f"{name} = {value:.4g} is below {policy.below:g}",
                                "values": {name: value, "below": policy.below}}
        new = outputs.get("labels.new")
        if not isinstance(new, int) or isinstance(new, bool):
            new = self.new_labels(endpoint)
        if new < policy.rows:
            return None
        return trigger_id, {"why": f"{new} new labelled rows (at least {policy.rows})",
                            "values": {"labels.new": new, "rows": policy.rows}}

    def trigger_manual(self, endpoint: str, spec: RetrainingSpec | dict[str, Any], actor: str,
                       reason: str = "") -> dict[str, Any]:
        """"Retrain now": a ``manual`` trigger, started by the DriftMonitor's next round. The
        cooldown does not hold a person back; max_concurrent does (Conflict naming the open
        trigger)."""
        spec = spec if isinstance(spec, RetrainingSpec) else RetrainingSpec.model_validate(spec)
        self.store.get_endpoint(endpoint)  # NotFound naming it
        now = _aware(self.clock())
        trigger_id = f"manual-{int(now.timestamp() * 1000):012x}-{uuid.uuid4().hex[:8]}"
        row = self._create(trigger_id, endpoint, "manual", {"why": reason or f"retraining asked for by {actor}",
                                                            "by": actor},
                           spec, run_id=None, now=now, actor=actor, enforce_cooldown=False)
        if row["status"] == "skipped":
            raise Conflict(f"endpoint {endpoint!r} has {spec.max_concurrent} retraining trigger(s) open "
                           f"({row['reason'].get('blocked_by')}); wait for them or raise max_concurrent",
                           details={"trigger_id": row["id"], "open": row["reason"].get("blocked_by")})
        return row

    def _create(self, trigger_id: str, endpoint: str, policy: str, reason: dict[str, Any], spec: RetrainingSpec,
                *, run_id: str | None, now: datetime, actor: str, enforce_cooldown: bool) -> dict[str, Any] | None:
        """Write the trigger (None when it exists already). It is written first and the limits
        checked after, in the same transaction: on SQLite the write takes the database's lock,
        on PostgreSQL an advisory lock per endpoint, so two monitors never both pass the check."""
        stored_reason = {**reason, "retraining": spec.model_dump(mode="json")}
        try:
            with self._tx() as s:  # no read before the insert: an existing id is the IntegrityError below
                if self.store.engine.dialect.name == "postgresql":
                    lock = int.from_bytes(hashlib.sha256(f"matih-retrain:{endpoint}".encode()).digest()[:8], "big",
                                          signed=True)
                    s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": lock})
                row = RetrainTrigger(id=trigger_id, endpoint=endpoint, policy=policy, reason=stored_reason,
                                     status="pending", run_id=(run_id or None) and run_id[:32], steps=[],
                                     created_at=now, updated_at=now)
                s.add(row)
                s.flush()
                blocked = self._blocked(s, endpoint, trigger_id, spec, now, enforce_cooldown)
                if blocked is not None:
                    why, detail = blocked
                    row.status, row.finished_at = "skipped", now
                    row.reason = {**stored_reason, "skipped": why, **detail}
                step = {"step": _STEP_OF[row.status], "at": now.isoformat(),
                        "detail": {"skipped": blocked[0]} if blocked else {"policy": policy}}
                row.steps = [step]
                s.flush()
                after = trigger_dict(row)
                MetadataStore._audit(s, actor, f"retrain.{step['step']}", "retrain_trigger", trigger_id, None,
                                     {k: after[k] for k in ("endpoint", "policy", "status", "reason", "run_id")})
                self.store._event(s, (f"retrain.{step['step']}", m.retrain_subject(endpoint, trigger_id),
                                      _event_data(after, None, step["detail"])))
                return after
        except IntegrityError:  # the id exists: this run's policy (or this slot) fired before
            return None

    @staticmethod
    def _blocked(s: Session, endpoint: str, trigger_id: str, spec: RetrainingSpec, now: datetime,
                 enforce_cooldown: bool) -> tuple[str, dict[str, Any]] | None:
        others = (RetrainTrigger.endpoint == endpoint, RetrainTrigger.id != trigger_id)
        open_ids = list(s.scalars(select(RetrainTrigger.id).where(*others, RetrainTrigger.status.in_(OPEN_STATUSES))
                                  .order_by(RetrainTrigger.created_at)))
        if len(open_ids) >= spec.max_concurrent:
            return (f"{len(open_ids)} trigger(s) of this endpoint are open (max_concurrent {spec.max_concurrent})",
                    {"blocked_by": open_ids})
        if enforce_cooldown and spec.cooldown_s > 0:
            last = s.scalar(select(func.max(RetrainTrigger.created_at))
                            .where(*others, RetrainTrigger.status != "skipped"))
            if last is not None and (now - _aware(last)).total_seconds() < spec.cooldown_s:
                return (f"within the cooldown: the last trigger was {(now - _aware(last)).total_seconds():.0f} s "
                        f"ago (cooldown_s {spec.cooldown_s:g})", {"last_trigger_at": _iso(last)})
        return None

    # -- moving -------------------------------------------------------------------------------------
    def _move(self, trigger_id: str, expect: str, status: str, detail: dict[str, Any], *,
              actor: str = LOOP_ACTOR, **fields: Any) -> dict[str, Any] | None:
        """Move a trigger from ``expect`` to ``status`` with its step, audit record and event in
        one transaction; None when the row no longer holds ``expect`` (another monitor moved it:
        nothing is written)."""
        now = _aware(self.clock())
        values: dict[str, Any] = {"status": status, "updated_at": now, **fields}
        if status in ENDED_STATUSES:
            values["finished_at"] = now
        with self._tx() as s:
            done = s.execute(update(RetrainTrigger).where(RetrainTrigger.id == trigger_id,
                                                          RetrainTrigger.status == expect)
                             .values(**values).execution_options(synchronize_session=False))
            if done.rowcount != 1:
                if s.get(RetrainTrigger, trigger_id) is None:
                    raise NotFound(f"retraining trigger {trigger_id!r} does not exist")
                return None
            row = s.get(RetrainTrigger, trigger_id)
            s.refresh(row)
            step = {"step": _STEP_OF[status], "at": now.isoformat(), "detail": detail}
            row.steps = [*(row.steps or []), step]
            s.flush()
            after = trigger_dict(row)
            MetadataStore._audit(s, actor, f"retrain.{step['step']}", "retrain_trigger", trigger_id,
                                 {"status": expect}, {"status": status, "detail": detail, "error": row.error})
            self.store._event(s, (f"retrain.{step['step']}", m.retrain_subject(row.endpoint, trigger_id),
                                  _event_data(after, expect, detail)))
        return after

    def _note(self, trigger_id: str, expect: str, error: str) -> None:
        """Keep why an open trigger waits (no step: it has not moved)."""
        with self._tx() as s:
            s.execute(update(RetrainTrigger).where(RetrainTrigger.id == trigger_id, RetrainTrigger.status == expect)
                      .values(error=error[:4000], updated_at=_aware(self.clock()))
                      .execution_options(synchronize_session=False))

    def advance(self, now: datetime | None = None, *, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Move every open trigger (of ``endpoint``; None: all) on as far as it goes now;
        returns the triggers that moved, as they are after. One trigger's trouble (MLflow
        briefly down) leaves it for the next round."""
        del now  # the clock given at construction decides; kept for the DriftMonitor's call
        with self._tx() as s:
            q = select(RetrainTrigger.id).where(RetrainTrigger.status.in_(OPEN_STATUSES))
            if endpoint is not None:
                q = q.where(RetrainTrigger.endpoint == endpoint)
            ids = list(s.scalars(q.order_by(RetrainTrigger.created_at)))
        moved = []
        for trigger_id in ids:
            try:
                out = self._advance_one(trigger_id)
            except Exception:  # noqa: BLE001 - one trigger's trouble never stops the others
                log.exception("retraining trigger %s: could not move it on; trying again next round", trigger_id)
                continue
            if out is not None:
                moved.append(out)
        return moved

    def _advance_one(self, trigger_id: str) -> dict[str, Any] | None:
        t = self.get(trigger_id)
        last = None
        for _ in range(len(TRIGGER_STATUSES)):  # each pass moves at most one step
            if t["status"] == "pending":
                out = self.start(trigger_id)
            elif t["status"] == "training":
                out = self._after_training(t)
            elif t["status"] == "challenger":
                out = self._roll_out(t)
            elif t["status"] == "rolling_out":
                out = self._after_rollout(t)
            else:
                return last
            if out is None or out["status"] == t["status"]:
                return last
            t = last = out
        return last

    # -- pending -> training ------------------------------------------------------------------------
    def start(self, trigger_id: str) -> dict[str, Any]:
        """Build the trigger's dataset and submit its training job (both repeatable); returns
        the trigger as it is after. A trigger no longer pending is returned as it is."""
        t = self.get(trigger_id)
        if t["status"] != "pending":
            return t
        spec = RetrainingSpec.model_validate(t["spec"] or {})
        plan: dict[str, Any] = {}
        dataset: dict[str, Any] | None = None
        try:
            endpoint = self.store.get_endpoint(t["endpoint"])
            self._plan(endpoint, spec, plan)
            dataset = self.build_dataset(trigger_id, t["endpoint"], spec.data, plan)
            if dataset["window_rows"] < spec.data.min_rows:
                why = (f"{dataset['window_rows']} labelled rows in the last {spec.data.window_days:g} days, fewer "
                       f"than min_rows ({spec.data.min_rows}); nothing was trained")
                return self._move(trigger_id, "pending", "skipped", {"skipped": why, "dataset": dataset},
                                  error=why, model=plan["model"], champion_version=plan["champion_version"]) \
                    or self.get(trigger_id)
            job_spec = build_job_spec(plan["base"], spec.training, dataset_uri=dataset["uri"], model=plan["model"],
                                      endpoint=t["endpoint"])
            job_spec = self._checked(job_spec)
        except DependencyUnavailable:
            raise  # the store, MLflow or the log briefly away: the next round tries again
        except MatihError as exc:  # it cannot go on as configured: the trigger ends, saying why
            detail = {"error": exc.message, **({"dataset": dataset} if dataset else {})}
            return self._move(trigger_id, "pending", "failed", detail, error=exc.message[:4000],
                              model=plan.get("model"), champion_version=plan.get("champion_version")) \
                or self.get(trigger_id)
        job_id = f"retrain-{trigger_id}"
        job = self.store.create_job("training", job_spec["name"], job_spec, LOOP_ACTOR, job_id=job_id,
                                    priority=int(job_spec.get("priority") or 0))
        return self._move(trigger_id, "pending", "training",
                          {"job_id": job["job_id"], "dataset": dataset, "base": plan["source"]},
                          job_id=job["job_id"], model=plan["model"], champion_version=plan["champion_version"]) \
            or self.get(trigger_id)

    def _checked(self, job_spec: dict[str, Any]) -> dict[str, Any]:
        """What ``POST /v1/training/jobs`` checks before it queues a job: the estimator allow-list
        and the paths under the data roots."""
        from app.training.spec import TrainingJobSpec, check_spec_paths

        spec = TrainingJobSpec.model_validate(job_spec)
        if spec.framework == "sklearn":
            if spec.estimator not in self.settings.jobs.allowed_estimators:
                raise InvalidInput(f"estimator {spec.estimator!r} is not allowed; choose one of: "
                                   f"{', '.join(self.settings.jobs.allowed_estimators)}", details={"field": "estimator"})
            from app.training.sklearn_trainer import build_estimator

            build_estimator(spec, self.settings)  # unknown keyword arguments: the trigger fails now, saying so
        return check_spec_paths(spec, self.settings).model_dump(mode="json")

    def _plan(self, endpoint: dict[str, Any], spec: RetrainingSpec, plan: dict[str, Any]) -> dict[str, Any]:
        """Fills ``plan`` (as far as it gets before an error, so a failed trigger still names the
        model and champion): the endpoint's model, its champion, the job spec to start from and
        the champion's features, task and classes (its tags, as the training job wrote them)."""
        from app.registry.mlflow_registry import TAG_CLASSES, TAG_FEATURES, TAG_JOB, TAG_TASK
        from app.registry.targets import parse_target

        model = parse_target(endpoint["target"]).name
        plan["model"] = model
        champion = self.registry.registry.resolve(f"{model}@champion", use_cache=False)
        plan["champion_version"] = str(champion.version)
        tags = champion.tags or {}
        if spec.job_spec is not None:
            base, source = spec.job_spec, {"job_spec": "retraining.job_spec"}
        else:
            job_id = tags.get(TAG_JOB)
            if not job_id:
                raise InvalidInput(
                    f"{model}@champion (version {champion.version}) was not trained by a job (no matih.job_id tag), "
                    "so there is no job spec to retrain from; give the monitor's retraining.job_spec",
                    details={"field": "retraining.job_spec"})
            try:
                base = self.store.get_job(job_id)["spec"]
            except NotFound:
                raise InvalidInput(
                    f"the job {job_id} that trained {model}@champion (version {champion.version}) is no longer in the "
                    "metadata store; give the monitor's retraining.job_spec", details={"field": "retraining.job_spec"}
                ) from None
            source = {"job_id": job_id}
        dataset = (base or {}).get("dataset") or {}
        if not dataset.get("target"):
            raise InvalidInput("the job spec to retrain from has no dataset.target",
                               details={"field": "retraining.job_spec"})
        features = json.loads(tags[TAG_FEATURES]) if TAG_FEATURES in tags else dataset.get("features")
        classes = json.loads(tags[TAG_CLASSES]) if TAG_CLASSES in tags else None
        plan.update({"base": base, "source": source, "target": dataset["target"], "features": features,
                     "task": tags.get(TAG_TASK), "classes": classes, "training_uri": dataset.get("uri")})
        return plan

    # -- the dataset --------------------------------------------------------------------------------
    def build_dataset(self, trigger_id: str, endpoint: str, data: RetrainData, plan: dict[str, Any]
                      ) -> dict[str, Any]:
        """The retraining set as one parquet file ``<retrain_data_root>/<trigger id>.parquet``:
        the window's labelled rows (logged inputs decoded to the champion's features, the label
        named as the job's target and of the training set's label type), then the champion's
        training set when ``include_training_set``. Written under a temporary name and renamed,
        so a repeated start rewrites it whole. Returns where it is and its row counts."""
        import pandas as pd

        from app.datasets import load_dataset

        target = plan["target"]
        training = None
        if data.include_training_set and plan["training_uri"]:
            training = load_dataset(plan["training_uri"], self.settings)
        features = plan["features"] or ([c for c in training.columns if c != target] if training is not None else None)
        now = _aware(self.clock())
        window, dropped = self._window_frame(endpoint, now - timedelta(days=data.window_days), now, features,
                                             target, plan)
        if features is None:
            features = [c for c in window.columns if c != target]
        if training is not None:
            missing = [c for c in [*features, target] if c not in training.columns]
            if missing:
                raise InvalidInput(f"the champion's training set {plan['training_uri']} lacks {missing}; set "
                                   "retraining.data.include_training_set to false", details={"field": "data"})
            training = training[[*features, target]]
            if len(window):
                try:
                    window[target] = window[target].astype(training[target].dtype)
                except (TypeError, ValueError) as exc:
                    raise InvalidInput(f"the logged labels do not fit the training set's label type "
                                       f"{training[target].dtype}: {exc}", details={"field": "feedback.label"}) from None
            frame = pd.concat([window[[*features, target]], training], ignore_index=True) if len(window) else training
        else:
            frame = window[[*features, target]] if len(window) else window.reindex(columns=[*features, target])
        uri = self._write(trigger_id, frame)
        return {"uri": uri, "rows": int(len(frame)), "window_rows": int(len(window)),
                "training_rows": 0 if training is None else int(len(training)), "dropped": dropped,
                "features": list(features), "target": target}

    def _write(self, trigger_id: str, frame) -> str:
        """``frame`` as ``<retrain_data_root>/<trigger id>.parquet`` (a local folder or s3://):
        written under a temporary name, then renamed, so a reader never sees half a file and a
        repeated start replaces it whole. Returns its URI."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        from app.storage.s3 import is_s3, resolve_uri

        root_uri = self.settings.retrain_data_root()
        root, fs = resolve_uri(root_uri, self.settings)
        fs.create_dir(root, recursive=True)
        path = f"{root.rstrip('/')}/{trigger_id}.parquet"
        tmp = f"{root.rstrip('/')}/.{trigger_id}.{uuid.uuid4().hex[:8]}.tmp"
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), tmp, filesystem=fs)
        fs.move(tmp, path)
        return f"s3://{path}" if is_s3(root_uri) else path

    def _window_frame(self, endpoint: str, since: datetime, until: datetime, features: list[str] | None,
                      target: str, plan: dict[str, Any]):
        """The window's labelled predictions as a DataFrame of the features and the target;
        rows without inputs, with a missing feature or with a label of another type are
        dropped and counted."""
        import pandas as pd
        import pyarrow.compute as pc

        from app.monitoring.window import as_float, decode_inputs
        from app.predlog.join import labeled

        table = labeled(self.settings, self.store, endpoint, since, until, how="inner")
        dropped = {"no_label": 0, "no_inputs": 0, "bad_label": 0, "missing_feature": 0}
        regression = plan.get("task") == "regression"
        if table.num_rows == 0:
            return pd.DataFrame(columns=[*(features or []), target]), dropped
        keep = pc.is_valid(table.column("inputs"))
        labelled = pc.is_valid(table.column("feedback_value" if regression else "feedback_label"))
        dropped["no_label"] = int(table.num_rows - (pc.sum(labelled).as_py() or 0))
        dropped["no_inputs"] = int(pc.sum(pc.and_(labelled, pc.invert(keep))).as_py() or 0)
        table = table.filter(pc.and_(keep, labelled))
        decoded = decode_inputs(table.column("inputs"), features)
        frame = pd.DataFrame({name: as_float(decoded.column(name)).to_numpy(zero_copy_only=False)
                              for name in decoded.column_names})
        if regression:
            labels = table.column("feedback_value").to_pylist()
        else:
            labels = [json.loads(v) for v in table.column("feedback_label").to_pylist()]
        frame[target] = self._cast_labels(labels, plan.get("classes"), regression)
        ok = frame[target].notna()
        dropped["bad_label"] += int((~ok).sum())
        complete = frame.drop(columns=[target]).notna().all(axis=1)
        dropped["missing_feature"] = int((ok & ~complete).sum())
        frame = frame[ok & complete].reset_index(drop=True)
        if str(frame[target].dtype) in ("Int64", "boolean"):  # no missing labels left: plain numpy types
            frame[target] = frame[target].astype("int64" if str(frame[target].dtype) == "Int64" else "bool")
        return frame, dropped

    @staticmethod
    def _cast_labels(labels: list[Any], classes: list[Any] | None, regression: bool):
        """Labels as the training set holds them: numbers for a regression; for a classifier the
        type of its classes (iris' ints stay ints, not the floats or strings feedback may
        carry); a label that does not convert is None (dropped)."""
        import pandas as pd

        def to_float(v):
            try:
                out = float(v)
            except (TypeError, ValueError):
                return None
            return out if math.isfinite(out) else None

        if regression:
            return pd.Series([to_float(v) for v in labels], dtype="float64")
        kinds = {type(c) for c in classes or []}
        if kinds and kinds <= {int}:
            def to_int(v):
                f = to_float(v) if not isinstance(v, bool) else None
                return int(f) if f is not None and f == int(f) else None
            return pd.Series([to_int(v) for v in labels], dtype="Int64")
        if kinds and kinds <= {float, int}:
            return pd.Series([to_float(v) for v in labels], dtype="float64")
        if kinds and kinds <= {bool}:
            return pd.Series([v if isinstance(v, bool) else None for v in labels], dtype="boolean")
        return pd.Series([None if v is None else str(v) for v in labels], dtype="object")

    # -- training -> gated | challenger -------------------------------------------------------------
    def _after_training(self, t: dict[str, Any]) -> dict[str, Any] | None:
        try:
            job = self.store.get_job(t["job_id"])
        except NotFound:
            why = f"the training job {t['job_id']} is gone from the metadata store"
            return self._move(t["id"], "training", "failed", {"error": why}, error=why)
        if job["status"] in ("queued", "running"):
            return None
        if job["status"] == "succeeded":
            result = job["result"] or {}
            version = result.get("model_version")
            if not version:
                why = f"the training job {job['job_id']} succeeded without registering a version"
                return self._move(t["id"], "training", "failed", {"error": why}, error=why)
            detail = {"job_id": job["job_id"], "version": str(version), "aliases": result.get("aliases"),
                      "metrics": result.get("metrics"), "validation": result.get("validation")}
            return self._move(t["id"], "training", "challenger", detail, candidate_version=str(version))
        error = job.get("error") or job["status"]
        partial = job.get("result") or {}
        if job["status"] == "failed" and str(error).startswith("validation_failed"):
            detail = {"job_id": job["job_id"], "error": error, "metrics": partial.get("metrics"),
                      "validation": partial.get("validation")}
            return self._move(t["id"], "training", "gated", detail, error=str(error)[:4000])
        why = f"the training job {job['job_id']} {job['status']}: {error}"
        return self._move(t["id"], "training", "failed", {"job_id": job["job_id"], "error": why}, error=why[:4000])

    # -- challenger -> rolling_out ------------------------------------------------------------------
    def _roll_out(self, t: dict[str, Any]) -> dict[str, Any] | None:
        """Create the challenger's canary rollout. A rollout of this candidate made by an earlier
        round that died before recording it is taken over, not made twice."""
        from app.rollouts.store import ACTIVE

        spec = RetrainingSpec.model_validate(t["spec"] or {})
        ctl = self._rollouts()
        since = datetime.fromisoformat(next((s["at"] for s in t["steps"] if s["step"] == "challenger"),
                                            t["created_at"]))
        items, _ = ctl.list(endpoint=t["endpoint"], limit=20)
        for r in items:
            if r["candidate"] == t["candidate_version"] and r["model"] == t["model"] \
                    and datetime.fromisoformat(r["created_at"]) >= since:
                return self._move(t["id"], "challenger", "rolling_out", {"rollout_id": r["id"], "adopted": True},
                                  rollout_id=r["id"], error=None)
        body = {**spec.rollout, "endpoint": t["endpoint"], "candidate": t["candidate_version"]}
        try:
            r = ctl.create(body, actor=LOOP_ACTOR)
        except Conflict as exc:
            busy, _ = ctl.list(endpoint=t["endpoint"], statuses=ACTIVE, limit=1)
            if busy:  # another rollout is in progress: the challenger waits for it
                self._note(t["id"], "challenger", f"waiting: {exc.message}")
                return None
            return self._move(t["id"], "challenger", "failed", {"error": exc.message},
                              error=f"the rollout could not start: {exc.message}"[:4000])
        except (InvalidInput, NotFound) as exc:
            return self._move(t["id"], "challenger", "failed", {"error": exc.message},
                              error=f"the rollout could not start: {exc.message}"[:4000])
        return self._move(t["id"], "challenger", "rolling_out",
                          {"rollout_id": r["id"], "baseline": r["baseline"], "candidate": r["candidate"],
                           "steps": r["spec"].get("steps")}, rollout_id=r["id"], error=None)

    # -- rolling_out -> promoted | rolled_back ------------------------------------------------------
    def _after_rollout(self, t: dict[str, Any]) -> dict[str, Any] | None:
        from app.rollouts.store import RolloutStore

        try:
            r = RolloutStore(self.store).get(t["rollout_id"])
        except NotFound:
            why = f"the rollout {t['rollout_id']} is gone"
            return self._move(t["id"], "rolling_out", "failed", {"error": why}, error=why)
        if r["status"] == "promoted":
            return self._move(t["id"], "rolling_out", "promoted",
                              {"rollout_id": r["id"], "champion": r["candidate"], "previous": r["baseline"]})
        if r["status"] in ("rolled_back", "aborted", "failed"):
            why = f"rollout {r['id']} {r['status']}: {r['error'] or ''}".rstrip(": ")
            return self._move(t["id"], "rolling_out", "rolled_back",
                              {"rollout_id": r["id"], "rollout_status": r["status"], "error": r["error"]},
                              error=why[:4000])
        return None

