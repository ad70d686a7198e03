"""THE join of logged predictions with their feedback, by (``request_id``, ``instance``).

Performance metrics, A/B analysis, bandits and retraining data all read predictions with their
outcomes through :func:`join_feedback` (or :func:`labeled`, which reads both sides for a time
window), so that every consumer agrees on which outcome belongs to which prediction: the
latest feedback per prediction (``FeedbackStore.latest``), matched on both keys.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from app.errors import DependencyUnavailable, InvalidInput
from app.predlog.feedback import FEEDBACK_SCHEMA, FeedbackStore
from app.predlog.layout import SCHEMA, hours_between
from app.predlog.lookup import log_root, partition_files

__all__ = ["KEYS", "PREFIX", "join_feedback", "labeled", "join_dataset", "read_window", "window_feedback"]

KEYS = ("request_id", "instance")
PREFIX = "feedback_"
_JOIN_TYPES = {"left": "left outer", "inner": "inner"}
# A prediction's timestamp and the time in its request id are taken a moment apart: feedback
# is read for a window this much wider than the predictions', and the join keeps what matches.
_ID_MARGIN = timedelta(minutes=5)
_RETRIES = 3
_ROW = "__matih_row"


def _key_table(table: pa.Table, side: str) -> pa.Table:
    for key in KEYS:
        if key not in table.column_names:
            raise InvalidInput(f"the {side} table has no {key!r} column; it needs both {list(KEYS)}")
    try:
        return pa.table(
            {
                "request_id": table.column("request_id").cast(pa.string()),
                "instance": table.column("instance").cast(pa.int64()),
                _ROW: pa.array(range(table.num_rows), pa.int64()),
            }
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidInput(f"the {side} table's keys are not a string request_id and an integer instance: {exc}") from None


def join_feedback(predictions: pa.Table, feedback: pa.Table, how: Literal["left", "inner"] = "left") -> pa.Table:
    """Predictions with their feedback: every column of ``predictions``, in its order and row
    order, then the feedback's non-key columns prefixed ``feedback_`` (``feedback_label``,
    ``feedback_value``, ``feedback_reward``, ``feedback_timestamp``, ...). ``how="left"`` keeps
    every prediction (feedback columns null where none arrived), ``"inner"`` only the labeled
    ones. ``feedback`` should hold one row per key, as ``FeedbackStore.latest`` gives; where it
    holds several, its last row for the key wins. Works for columns of any type (lists such as
    ``probabilities`` included), which pyarrow's own join does not carry."""
    if how not in _JOIN_TYPES:
        raise InvalidInput(f"how={how!r}: use 'left' or 'inner'")
    extra = [c for c in feedback.column_names if c not in KEYS]
    clash = sorted(set(PREFIX + c for c in extra) & set(predictions.column_names))
    if clash:
        raise InvalidInput(f"the predictions already have the column(s) {clash}; join them before adding feedback")
    left = _key_table(predictions, "predictions")
    right = _key_table(feedback, "feedback").group_by(list(KEYS)).aggregate([(_ROW, "max")])
    joined = left.join(right, list(KEYS), join_type=_JOIN_TYPES[how], use_threads=False).sort_by(_ROW)
    out = predictions.take(joined.column(_ROW))
    matched = feedback.select(extra).take(joined.column(f"{_ROW}_max"))
    for name in extra:
        out = out.append_column(pa.field(PREFIX + name, matched.schema.field(name).type), matched.column(name))
    return out


def _utc(value: datetime, name: str) -> datetime:
    if not isinstance(value, datetime):
        raise InvalidInput(f"{name} must be a datetime, not {type(value).__name__}")
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


def read_window(settings, endpoint: str, since: datetime, until: datetime) -> pa.Table:
    """The logged predictions of ``endpoint`` with ``since <= timestamp < until``, one row per
    (request_id, instance, variant) (a record written twice, after a retried flush, counts once), ordered
    by timestamp. Reads only the hour partitions of the window."""
    since, until = _utc(since, "since"), _utc(until, "until")
    if until <= since:
        raise InvalidInput(f"until ({until.isoformat()}) must be after since ({since.isoformat()})")
    root, fs = log_root(settings)
    window = (pc.field("timestamp") >= pa.scalar(since, SCHEMA.field("timestamp").type)) & (
        pc.field("timestamp") < pa.scalar(until, SCHEMA.field("timestamp").type)
    )
    parts = []
    for hour in hours_between(since, until):
        parts.append(_read_partition(fs, root, endpoint, hour, window))
    table = pa.concat_tables(parts) if parts else SCHEMA.empty_table()
    if table.num_rows == 0:
        return SCHEMA.empty_table()
    # One row per (request_id, instance, variant): a record written twice counts once, and the
    # shadow log (app.predlog.layout.shadow_log) holds one row per shadow of a request.
    keys = _key_table(table, "prediction log").append_column("variant", table.column("variant"))
    first = keys.group_by([*KEYS, "variant"]).aggregate([(_ROW, "min")]).column(f"{_ROW}_min")
    table = table.take(first)
    return table.sort_by([("timestamp", "ascending"), ("request_id", "ascending"), ("instance", "ascending")])


def _read_partition(fs, root: str, endpoint: str, hour: str, window) -> pa.Table:
    for attempt in range(_RETRIES):
        files = partition_files(fs, root, endpoint, hour)
        if not files:
            return SCHEMA.empty_table()
        try:
            return pads.dataset(files, schema=SCHEMA, format="parquet", filesystem=fs).to_table(filter=window)
        except FileNotFoundError:
            if attempt == _RETRIES - 1:
                raise DependencyUnavailable(
                    f"the prediction log's partition {endpoint}/{hour} kept changing while it was read; try again"
                ) from None
        except (OSError, pa.ArrowInvalid) as exc:
            raise DependencyUnavailable(f"the prediction log at {root} is unreadable: {exc}") from None
    return SCHEMA.empty_table()


def labeled(
    settings, store, endpoint: str, since: datetime, until: datetime, how: Literal["left", "inner"] = "inner"
) -> pa.Table:
    """The predictions of ``endpoint`` made in ``[since, until)`` joined with their current
    feedback (:func:`join_feedback`); ``how="inner"`` (the default) keeps the labeled ones, the
    training and evaluation set; ``"left"`` every prediction. ``store`` is the MetadataStore (or
    a FeedbackStore over it)."""
    predictions = read_window(settings, endpoint, since, until)
    feedback = window_feedback(store, endpoint, since, until) if predictions.num_rows else FEEDBACK_SCHEMA.empty_table()
    return join_feedback(predictions, feedback, how=how)


def window_feedback(store, endpoint: str, since: datetime, until: datetime) -> pa.Table:
    """The current feedback (``FEEDBACK_SCHEMA``) of the predictions ``endpoint`` made in
    ``[since, until)``: read by request-id time with a margin on both sides (an id is issued a
    moment before or after its record's timestamp). ``store``: the MetadataStore or a
    FeedbackStore over it."""
    feedback_store = store if isinstance(store, FeedbackStore) else FeedbackStore(store)
    since, until = _utc(since, "since"), _utc(until, "until")
    return feedback_store.latest(endpoint, since=since - _ID_MARGIN, until=until + _ID_MARGIN)


def _join_batch(batch: pa.Table, feedback: pa.Table, how: Literal["left", "inner"]) -> pa.Table:
    return join_feedback(batch, feedback, how=how)


def join_dataset(ds, feedback: pa.Table, how: Literal["left", "inner"] = "left"):
    """:func:`join_feedback` over a Ray Dataset of logged predictions (``app.predlog.read``),
    batch by batch, for windows too large for one table: the feedback table travels once to
    the workers (Ray stores the function's arguments in the object store), the predictions
    stream. Returns the joined ``ray.data.Dataset``."""
    if how not in _JOIN_TYPES:
        raise InvalidInput(f"how={how!r}: use 'left' or 'inner'")
    return ds.map_batches(_join_batch, batch_format="pyarrow", fn_kwargs={"feedback": feedback, "how": how})
