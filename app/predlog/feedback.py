"""Feedback on logged predictions: ground truth labels, values and rewards that arrive after the
prediction (minutes or days later), stored in the metadata store's ``feedback`` table.

The table is append-only. Reporting a new outcome for a prediction (``request_id``,
``instance``) adds a row that supersedes the earlier one, so every value ever given stays on
record and :meth:`FeedbackStore.history` shows them in order; :meth:`FeedbackStore.latest` is
the current outcome of each prediction, the side of the join (``app.predlog.join``) that
metrics, A/B analysis, bandits and retraining read.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError, field_validator
from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.orm import Session, aliased

from app.errors import InvalidInput
from app.predlog.ids import is_request_id, request_id_time
from app.store.models import AuditRecord, Feedback
from app.timestamps import parse_timestamp

__all__ = ["FEEDBACK_SCHEMA", "FeedbackRow", "FeedbackStore", "id_floor"]

# One row per prediction (request_id, instance): its current outcome. ``label`` is the JSON text
# of the label (json.dumps, as the prediction log's ``prediction`` column), so a label compares
# with a prediction whatever its type; null when the feedback gave none.
FEEDBACK_SCHEMA = pa.schema(
    [
        pa.field("request_id", pa.string(), nullable=False),
        pa.field("instance", pa.int32(), nullable=False),
        pa.field("label", pa.string()),
        pa.field("value", pa.float64()),
        pa.field("reward", pa.float64()),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("received_at", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("actor", pa.string(), nullable=False),
    ]
)

_MAX_INSTANCE = 2**31 - 1  # the column is a 32-bit INTEGER on PostgreSQL
_MAX_LABEL_CHARS = 1024
_MAX_LABEL_INT = 2**63
_IN_CHUNK = 500  # ids per IN (...) list: under SQLite's and PostgreSQL's parameter limits
_ACTOR_CHARS = 128


class FeedbackRow(BaseModel):
    """One outcome for one logged prediction: the row ``instance`` of the request ``request_id``
    (the server-issued id the predict answer carried). At least one of ``label``, ``value`` and
    ``reward`` is required."""

    model_config = ConfigDict(extra="forbid")

    request_id: StrictStr = Field(
        ..., max_length=64, description="The request id the server returned with the prediction (32 hex digits)."
    )
    instance: StrictInt = Field(
        0, ge=0, le=_MAX_INSTANCE, description="Which row of the request (0 for a one-row request)."
    )
    label: Any = Field(
        None, description="Ground truth for a classifier: a JSON scalar (string, number or boolean), compared "
        "with the logged prediction.",
        json_schema_extra={"anyOf": [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]},
    )
    value: StrictFloat | None = Field(
        None, allow_inf_nan=False, description="Ground truth for a regressor: a finite number."
    )
    reward: StrictFloat | None = Field(
        None, allow_inf_nan=False, description="A business outcome or reward for experiments and bandits: a finite number."
    )
    timestamp: datetime | None = Field(
        None, description="When the outcome happened: ISO 8601 (no zone = UTC) or epoch seconds; default: now.",
        json_schema_extra={"anyOf": [{"type": "string", "format": "date-time"}, {"type": "number"}, {"type": "null"}]},
    )

    @field_validator("label")
    @classmethod
    def _scalar_label(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, (str, bool, int, float)):
            raise ValueError("must be a JSON scalar: a string, number or boolean")
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError("must be finite (NaN and infinities are not JSON)")
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= _MAX_LABEL_INT:
            raise ValueError("an integer must fit in 64 bits")
        if isinstance(value, str) and len(value) > _MAX_LABEL_CHARS:
            raise ValueError(f"a string holds at most {_MAX_LABEL_CHARS} characters")
        return value

    @field_validator("timestamp", mode="before")
    @classmethod
    def _timestamp(cls, value: Any) -> datetime | None:
        return None if value is None else parse_timestamp(value)

    def outcome(self) -> tuple[Any, float | None, float | None]:
        return self.label, self.value, self.reward


def id_floor(at: datetime) -> str:
    """The smallest request id the server issues at ``at``: request ids sort by time, so a time
    range of predictions is a range of ids (``id_floor(since) <= request_id < id_floor(until)``)."""
    ms = max(0, int(at.timestamp() * 1000))
    return f"{min(ms, 16**12 - 1):012x}" + "0" * 20


def _row_error(exc: ValidationError) -> str:
    problems = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err.get("loc", ()))
        message = str(err.get("msg")).removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else type(value).__name__


def _echo_id(raw: Any) -> str | None:
    value = raw.get("request_id") if isinstance(raw, dict) else getattr(raw, "request_id", None)
    return value if isinstance(value, str) and len(value) <= 64 else None


def _aware(value: datetime) -> datetime:
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


class FeedbackStore:
    """Feedback on one metadata store (SQLite or PostgreSQL): recording batches in one
    transaction with their audit record, and reading the current or every value back."""

    def __init__(self, store):
        self.store = store

    def _tx(self) -> AbstractContextManager[Session]:
        return self.store.transaction()

    # -- writing ------------------------------------------------------------------------------
    def record(
        self,
        endpoint: str,
        rows: Sequence[Any],
        actor: str,
        *,
        known: Callable[[list[str]], set[str] | Mapping[str, str]],
        grace_s: float = 120.0,
        bandit_arms: Collection[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Validate and store a batch of feedback for ``endpoint``; one result per row, in order.

        ``rows`` are :class:`FeedbackRow` or the JSON objects to validate as one. ``known(ids)``
        says which of the request ids the prediction log holds (``app.predlog.lookup``): a set, or
        a mapping ``{request_id: variant}`` (``request_variants``) whose variant each stored row
        records (``""`` or a pending id: none). A row is
        rejected, with its ``error``, when it is malformed, gives no outcome, names an id the
        server never issues, or an id the log does not hold that is older than ``grace_s``
        seconds (``predlog.feedback_grace_s``); an id younger than that is accepted as
        ``pending`` (its record may still be in a replica's buffer). Rejected rows never fail the
        batch. An accepted row that repeats the current outcome (same label, value and reward;
        same timestamp if one is given) is ``unchanged`` and not stored again, so a retried
        batch adds nothing; any other accepted row is stored, ``superseded`` when it replaces an
        earlier value. The stored rows and ONE audit record (``feedback.record``, with the
        counts and ``received_at``, which marks the batch's rows) go in one transaction.

        ``bandit_arms``: the variants of the endpoint's bandit plan (None: it has none). A stored
        row served by one of them moves that arm's reward sums (:class:`app.traffic.bandits.BanditStore`)
        from the prediction's previous reward to its new one, in the same transaction, so each
        prediction's current reward counts once."""
        results: list[dict[str, Any]] = []
        parsed: list[tuple[int, FeedbackRow, datetime]] = []
        for index, raw in enumerate(rows):
            result: dict[str, Any] = {"index": index, "request_id": _echo_id(raw)}
            results.append(result)
            if not isinstance(raw, (dict, FeedbackRow)):
                result.update(status="rejected", error=f"a row must be a JSON object, not {_json_type(raw)}")
                continue
            try:
                row = raw if isinstance(raw, FeedbackRow) else FeedbackRow.model_validate(raw)
            except ValidationError as exc:
                result.update(status="rejected", error=_row_error(exc))
                continue
            issued = request_id_time(row.request_id) if is_request_id(row.request_id) else None
            if issued is None:
                result.update(
                    status="rejected", error="request_id: not an id this server issues (32 hex digits, lower case)"
                )
            elif row.label is None and row.value is None and row.reward is None:
                result.update(status="rejected", error="give at least one of label, value and reward")
            else:
                parsed.append((index, row, issued))

        ids = sorted({row.request_id for _, row, _ in parsed})
        found = known(ids) if ids else set()
        variants: Mapping[str, str] = found if isinstance(found, Mapping) else {}
        in_log = set(found)
        now_s = time.time()
        candidates: list[tuple[int, FeedbackRow, bool]] = []
        for index, row, issued in parsed:
            if row.request_id in in_log:
                candidates.append((index, row, False))
                continue
            age_s = now_s - issued.timestamp()
            if age_s > grace_s:
                results[index].update(status="rejected", error="unknown request id: the prediction log does not hold it")
            elif age_s < -grace_s:
                results[index].update(status="rejected", error="unknown request id: it names a time in the future")
            else:
                candidates.append((index, row, True))
        if not candidates:
            return results

        received_at = datetime.now(timezone.utc)
        actor = actor[:_ACTOR_CHARS]
        counts = {"accepted": 0, "rejected": 0, "pending": 0, "superseded": 0, "unchanged": 0, "stored": 0}
        bandits = _bandits(self.store) if bandit_arms else None
        arms = set(bandit_arms or ())
        with self._tx() as s:
            current = self._current(s, endpoint, sorted({row.request_id for _, row, _ in candidates}))
            inserts = []
            moves: list[tuple[str | None, float | None, str | None, float | None]] = []
            for index, row, pending in candidates:
                key = (row.request_id, row.instance)
                before = current.get(key)
                result = results[index]
                result["status"] = "accepted"
                if pending:
                    result["pending"] = True
                    counts["pending"] += 1
                if before is not None and _same_outcome(before, row):
                    result["unchanged"] = True
                    counts["unchanged"] += 1
                    continue
                timestamp = row.timestamp or received_at
                if before is not None:
                    result["superseded"] = True
                    counts["superseded"] += 1
                variant = variants.get(row.request_id) or None
                current[key] = (*row.outcome(), timestamp, variant)
                moves.append((before[4] if before else None, before[2] if before else None, variant, row.reward))
                inserts.append(
                    {
                        "endpoint": endpoint, "request_id": row.request_id, "instance": row.instance,
                        "label": row.label, "value": row.value, "reward": row.reward, "variant": variant,
                        "timestamp": timestamp, "received_at": received_at, "actor": actor,
                    }
                )
            counts["accepted"] = len(candidates)
            counts["rejected"] = len(results) - len(candidates)
            counts["stored"] = len(inserts)
            if inserts:
                s.execute(insert(Feedback.__table__), inserts)  # type: ignore[arg-type]  # Core: no ORM bookkeeping
                if bandits is not None:
                    for variant, delta in _arm_deltas(moves, arms).items():
                        bandits.add(s, endpoint, variant, *delta)
                s.add(
                    AuditRecord(
                        at=received_at, actor=actor, action="feedback.record", resource_type="endpoint",
                        resource_id=endpoint, before=None, after={**counts, "received_at": received_at.isoformat()},
                    )
                )
        return results

    def _current(self, s: Session, endpoint: str, ids: list[str]) -> dict[tuple[str, int], tuple]:
        """(request_id, instance) -> (label, value, reward, timestamp, variant) of the latest stored row."""
        out: dict[tuple[str, int], tuple] = {}
        for chunk in _chunks(ids):
            q = (
                select(Feedback.request_id, Feedback.instance, Feedback.label, Feedback.value, Feedback.reward,
                       Feedback.timestamp, Feedback.variant, Feedback.id)
                .where(Feedback.endpoint == endpoint, Feedback.request_id.in_(chunk))
                .order_by(Feedback.id)
            )
            for rid, inst, label, value, reward, ts, variant, _ in s.execute(q):
                out[(rid, inst)] = (label, value, reward, _aware(ts), variant)
        return out

    def settle_pending(
        self,
        endpoint: str,
        known: Callable[[list[str]], Mapping[str, str]],
        *,
        bandit_arms: Collection[str],
        window_s: float = 300.0,
        limit: int = 2000,
    ) -> int:
        """Fill in the variant of feedback that arrived while its prediction's log record was
        still on its way (``pending``: stored without a variant), now that the log holds it, and
        count its reward in the bandit arm it belongs to. Without this, rewards sent right after
        the prediction (within the log's write interval) would never reach a bandit.

        Looks at the (at most ``limit`` oldest) rows received in the last ``window_s`` seconds
        that have no variant; ``known(ids)`` is :func:`app.predlog.lookup.request_variants`. Each row is
        filled in by ``UPDATE ... WHERE variant IS NULL`` (and no later row supersedes it), so
        when two replicas settle the same row only one counts it. Returns the number of rows
        filled in."""
        arms = set(bandit_arms)
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=window_s)
        with self._tx() as s:
            pending = s.execute(
                select(Feedback.id, Feedback.request_id, Feedback.instance, Feedback.reward)
                .where(Feedback.endpoint == endpoint, Feedback.received_at >= cutoff, Feedback.variant.is_(None))
                .order_by(Feedback.id)
                .limit(limit)
            ).all()
        if not pending:
            return 0
        found = known(sorted({row.request_id for row in pending}))
        fills = [(row, found[row.request_id]) for row in pending if found.get(row.request_id)]
        if not fills:
            return 0
        bandits = _bandits(self.store) if arms else None
        filled = 0
        moves: list[tuple[str | None, float | None, str | None, float | None]] = []
        later = aliased(Feedback)  # a row superseded meanwhile is left alone: its successor counts
        with self._tx() as s:
            for row, variant in fills:
                newer = (
                    select(later.id)
                    .where(later.endpoint == endpoint, later.request_id == row.request_id,
                           later.instance == row.instance, later.id > row.id)
                    .exists()
                )
                done = s.execute(  # type: ignore[attr-defined]  # an UPDATE's CursorResult
                    update(Feedback)
                    .where(Feedback.id == row.id, Feedback.variant.is_(None), ~newer)
                    .values(variant=variant)
                    .execution_options(synchronize_session=False)
                ).rowcount
                if done != 1:
                    continue  # another replica settled it
                filled += 1
                moves.append((None, None, variant, row.reward))  # counted nowhere until now
            if bandits is not None:
                for variant, delta in _arm_deltas(moves, arms).items():
                    bandits.add(s, endpoint, variant, *delta)
        return filled

    # -- reading ------------------------------------------------------------------------------
    def latest(
        self,
        endpoint: str,
        request_ids: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> pa.Table:
        """The current outcome of each prediction of ``endpoint`` (its latest row), as a table of
        :data:`FEEDBACK_SCHEMA`, ordered by request id and instance. ``request_ids`` limits it to
        those requests; ``since`` / ``until`` to predictions made in ``[since, until)`` (by the
        time in their request id, so the range is one index scan)."""
        cond = [Feedback.endpoint == endpoint]
        if since is not None:
            cond.append(Feedback.request_id >= id_floor(since))
        if until is not None:
            cond.append(Feedback.request_id < id_floor(until))
        chunks = [None] if request_ids is None else list(_chunks(sorted(set(request_ids))))
        columns = (
            Feedback.request_id, Feedback.instance, Feedback.label, Feedback.value, Feedback.reward,
            Feedback.timestamp, Feedback.received_at, Feedback.actor,
        )
        rows: list[Any] = []
        with self._tx() as s:
            for chunk in chunks:
                where = cond if chunk is None else [*cond, Feedback.request_id.in_(chunk)]
                newest = select(func.max(Feedback.id).label("id")).where(*where).group_by(
                    Feedback.request_id, Feedback.instance
                ).subquery()
                rows.extend(s.execute(select(*columns).join(newest, Feedback.id == newest.c.id)).all())
        rows.sort(key=lambda r: (r[0], r[1]))
        rid, inst, label, value, reward, ts, received, actor = zip(*rows) if rows else ([],) * 8
        return pa.Table.from_pydict(
            {
                "request_id": list(rid),
                "instance": list(inst),
                "label": [None if x is None else json.dumps(x) for x in label],
                "value": list(value),
                "reward": list(reward),
                "timestamp": [_aware(x) for x in ts],
                "received_at": [_aware(x) for x in received],
                "actor": list(actor),
            },
            schema=FEEDBACK_SCHEMA,
        )

    def history(self, endpoint: str, request_id: str) -> list[dict[str, Any]]:
        """Every value given for the request ``request_id`` of ``endpoint``, oldest first: the
        audit trail of its feedback (the last one per instance is the current one)."""
        if not isinstance(request_id, str) or len(request_id) > 64:
            raise InvalidInput(f"request id {str(request_id)[:64]!r} is not one this server issues")
        with self._tx() as s:
            rows = list(
                s.scalars(
                    select(Feedback)
                    .where(Feedback.endpoint == endpoint, Feedback.request_id == request_id)
                    .order_by(Feedback.id)
                )
            )
        return [
            {
                "id": r.id, "request_id": r.request_id, "instance": r.instance, "label": r.label, "value": r.value,
                "reward": r.reward, "timestamp": _aware(r.timestamp).isoformat(),
                "received_at": _aware(r.received_at).isoformat(), "actor": r.actor,
            }
            for r in rows
        ]


    # -- erasure ------------------------------------------------------------------------------
    def erase(self, endpoint: str, request_ids: Sequence[str], actor: str) -> int:
        """Delete every feedback row of these requests of ``endpoint``: the feedback side of an
        erasure request (the log's files are rewritten by the prediction log's own erasure). The
        one exception to append-only; one audit record (``feedback.erase``) with the count, not
        the ids. Returns the number of rows deleted."""
        ids = sorted({rid for rid in request_ids if isinstance(rid, str)})
        if not ids:
            return 0
        deleted = 0
        with self._tx() as s:
            for chunk in _chunks(ids):
                result = s.connection().execute(
                    delete(Feedback).where(Feedback.endpoint == endpoint, Feedback.request_id.in_(chunk))
                )
                deleted += result.rowcount
            if deleted:
                s.add(
                    AuditRecord(
                        at=datetime.now(timezone.utc), actor=actor[:_ACTOR_CHARS], action="feedback.erase",
                        resource_type="endpoint", resource_id=endpoint, before=None,
                        after={"requests": len(ids), "rows_deleted": deleted},
                    )
                )
        return deleted

def _same_outcome(before: tuple, row: FeedbackRow) -> bool:
    """Whether ``row`` repeats the stored outcome ``before`` (label compared with its JSON type:
    1, 1.0 and true are different labels)."""
    label, value, reward, timestamp = before[:4]
    return (
        type(label) is type(row.label) and label == row.label and value == row.value and reward == row.reward
        and row.timestamp in (None, timestamp)
    )


def _bandits(store):
    from app.traffic.bandits import BanditStore  # the traffic package sits above the prediction log

    return BanditStore(store)


def _arm_deltas(
    moves: list[tuple[str | None, float | None, str | None, float | None]], arms: set[str]
) -> dict[str, list]:
    """The summed (dn, dsum, dsq) per arm of moving each prediction's reward from (old variant,
    old reward) to (new variant, new reward). A reward counts in an arm when its row names a
    variant of the plan; the variant only changes from none (feedback that came while the log
    record was pending) to the one the log names, and a reward counted under no arm is not
    taken back from any."""
    from app.traffic.bandits import reward_delta

    out: dict[str, list] = {}

    def add(variant: str, old: float | None, new: float | None) -> None:
        if old == new:
            return
        acc = out.setdefault(variant, [0, 0.0, 0.0])
        for i, d in enumerate(reward_delta(old, new)):
            acc[i] += d

    for old_variant, old_reward, new_variant, new_reward in moves:
        old_arm = old_variant if old_reward is not None and old_variant in arms else None
        new_arm = new_variant if new_reward is not None and new_variant in arms else None
        if old_arm is not None and old_arm == new_arm:
            add(old_arm, old_reward, new_reward)
            continue
        if old_arm is not None:
            add(old_arm, old_reward, None)
        if new_arm is not None:
            add(new_arm, None, new_reward)
    return {v: d for v, d in out.items() if d[0] != 0 or d[1] != 0.0 or d[2] != 0.0}


def _chunks(values: list[str]) -> Iterator[list[str]]:
    for start in range(0, len(values), _IN_CHUNK):
        yield values[start : start + _IN_CHUNK]
