"""Feedback on logged predictions: the store (SQLite and PostgreSQL), the request-id lookup in
the log's parquet partitions, and the join of predictions with feedback. The log's files are
written here with pyarrow in the layout's schema, as the PredictionLog actor writes them."""

from __future__ import annotations

import json
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.errors import InvalidInput
from app.predlog.feedback import FEEDBACK_SCHEMA, FeedbackStore, id_floor
from app.predlog.ids import new_request_id, request_id_time
from app.predlog.join import join_feedback, labeled, read_window
from app.predlog.layout import SCHEMA, hour_of, partition_dir
from app.predlog.lookup import known_request_ids
from app.settings import load_settings

EP = "churn"


def everything(ids):
    return set(ids)


def log_rows(request_id: str, n: int = 1, *, endpoint: str = EP, at: datetime | None = None, prediction=0):
    """The records of one request of ``n`` rows, as the log stores them."""
    at = at or request_id_time(request_id)
    return [
        {
            "request_id": request_id, "instance": i, "client_request_id": None, "timestamp": at,
            "endpoint": endpoint, "variant": "", "model": "m", "model_version": "1", "protocol": "rest",
            "inputs": json.dumps({"x": i}), "prediction": json.dumps(prediction if n == 1 else i),
            "probabilities": [0.25, 0.75], "latency_ms": 1.5, "caller": "tester",
        }
        for i in range(n)
    ]


def write_log(root: str, rows: list[dict], endpoint: str = EP) -> list[str]:
    """One parquet file per hour partition the rows fall in (by timestamp), as a flush writes."""
    by_hour: dict[str, list[dict]] = {}
    for row in rows:
        by_hour.setdefault(hour_of(row["timestamp"]), []).append(row)
    paths = []
    for hour, part in by_hour.items():
        folder = Path(partition_dir(root, endpoint, hour))
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{uuid.uuid4().hex}.parquet"
        pq.write_table(pa.Table.from_pylist(part, schema=SCHEMA), path)
        paths.append(str(path))
    return paths


@pytest.fixture
def settings(tmp_path):
    return load_settings("local", matih_home=str(tmp_path / "home"))


@pytest.fixture
def feedback(store):
    return FeedbackStore(store)


# -- the store ---------------------------------------------------------------------------------
def test_ten_thousand_rows_in_one_batch_fast_with_one_audit_record(store, feedback):
    ids = [new_request_id() for _ in range(10_000)]
    rows = [{"request_id": rid, "label": i % 3, "reward": 0.5} for i, rid in enumerate(ids)]
    start = time.perf_counter()
    results = feedback.record(EP, rows, "alice", known=everything)
    elapsed = time.perf_counter() - start
    print(f"10,000 feedback rows on {store.engine.dialect.name}: {elapsed:.2f} s")
    assert elapsed < 5.0
    assert [r["status"] for r in results] == ["accepted"] * 10_000
    assert [r["index"] for r in results] == list(range(10_000))
    table = feedback.latest(EP)
    assert table.num_rows == 10_000 and table.schema == FEEDBACK_SCHEMA
    audit, _ = store.list_audit(resource_type="endpoint")
    records = [a for a in audit if a["action"] == "feedback.record"]
    assert len(records) == 1
    assert records[0]["after"]["accepted"] == 10_000 and records[0]["after"]["stored"] == 10_000
    assert records[0]["actor"] == "alice" and records[0]["resource_id"] == EP


def test_later_value_supersedes_and_both_stay_on_record(store, feedback):
    rid = new_request_id()
    first = feedback.record(EP, [{"request_id": rid, "label": "cat", "timestamp": "2026-12-01T10:00:00Z"}], "a", known=everything)
    assert first[0] == {"index": 0, "request_id": rid, "status": "accepted"}
    again = feedback.record(EP, [{"request_id": rid, "label": "dog", "timestamp": 1_764_590_400}], "b", known=everything)
    assert again[0]["superseded"] is True
    current = feedback.latest(EP).to_pylist()
    assert len(current) == 1 and current[0]["label"] == '"dog"' and current[0]["actor"] == "b"
    assert current[0]["timestamp"] == datetime(2025, 12, 1, 12, 0, tzinfo=timezone.utc)
    history = feedback.history(EP, rid)
    assert [h["label"] for h in history] == ["cat", "dog"] and [h["actor"] for h in history] == ["a", "b"]
    assert history[0]["timestamp"] == "2026-12-01T10:00:00+00:00"
    audit = [a for a in store.list_audit()[0] if a["action"] == "feedback.record"]
    assert [a["after"]["superseded"] for a in audit] == [1, 0]  # newest first


def test_repeating_the_current_value_stores_nothing(store, feedback):
    rid = new_request_id()
    row = {"request_id": rid, "instance": 1, "value": 3.25}
    feedback.record(EP, [row], "a", known=everything)
    out = feedback.record(EP, [row, row], "a", known=everything)
    assert out == [{"index": i, "request_id": rid, "status": "accepted", "unchanged": True} for i in (0, 1)]
    assert len(feedback.history(EP, rid)) == 1
    assert len([a for a in store.list_audit()[0] if a["action"] == "feedback.record"]) == 1
    # A label of another JSON type is another label: 1 is not true, nor 1.0
    feedback.record(EP, [{"request_id": rid, "label": 1}], "a", known=everything)
    out = feedback.record(EP, [{"request_id": rid, "label": True}, {"request_id": rid, "label": 1.0}], "a", known=everything)
    assert [r.get("superseded") for r in out] == [True, True]
    assert [h["label"] for h in feedback.history(EP, rid) if h["instance"] == 0] == [1, True, 1.0]


def test_duplicates_within_a_batch_keep_the_last(feedback):
    rid = new_request_id()
    out = feedback.record(EP, [{"request_id": rid, "reward": 1.0}, {"request_id": rid, "reward": 0.0}], "a", known=everything)
    assert "superseded" not in out[0] and out[1]["superseded"] is True
    assert feedback.latest(EP).column("reward").to_pylist() == [0.0]


def test_unknown_ids_rejected_per_row_recent_ones_pending(feedback):
    old = new_request_id(time.time() - 3600)
    recent = new_request_id(time.time() - 5)
    logged_old = new_request_id(time.time() - 3600)
    future = new_request_id(time.time() + 3600)
    rows = [{"request_id": rid, "label": "x"} for rid in (old, recent, logged_old, future)]
    out = feedback.record(EP, rows, "a", known=lambda ids: {logged_old} & set(ids), grace_s=120)
    assert out[0]["status"] == "rejected" and "unknown request id" in out[0]["error"]
    assert out[1] == {"index": 1, "request_id": recent, "status": "accepted", "pending": True}
    assert out[2] == {"index": 2, "request_id": logged_old, "status": "accepted"}
    assert out[3]["status"] == "rejected" and "future" in out[3]["error"]
    assert sorted(feedback.latest(EP).column("request_id").to_pylist()) == sorted([recent, logged_old])


def test_bad_rows_reported_per_row_and_the_rest_stored(feedback):
    good = new_request_id()
    rows = [
        {"request_id": good, "label": "ok"},
        {"request_id": "not-ours", "label": 1},
        {"request_id": good},  # no outcome
        {"label": 1},  # no id
        {"request_id": good, "label": [1, 2]},
        {"request_id": good, "label": {"a": 1}},
        {"request_id": good, "value": "3"},
        {"request_id": good, "value": True},
        {"request_id": good, "reward": 1e400},
        {"request_id": good, "instance": -1, "label": 1},
        {"request_id": good, "instance": 2**31, "label": 1},
        {"request_id": good, "label": 1, "timestamp": "yesterday"},
        {"request_id": good, "label": 1, "timestamp": -5},
        {"request_id": good, "label": 1, "extra": 1},
        {"request_id": 123, "label": 1},
        {"request_id": good.upper(), "label": 1},
        "a string",
        None,
        [good, 1],
        {"request_id": good, "label": "x" * 2000},
        {"request_id": good, "label": 2**70},
    ]
    out = feedback.record(EP, rows, "a", known=everything)
    assert out[0]["status"] == "accepted"
    for r in out[1:]:
        assert r["status"] == "rejected" and r["error"], r
    assert out[1]["error"].startswith("request_id:")
    assert "at least one of label, value and reward" in out[2]["error"]
    assert out[3]["error"].startswith("request_id:") and out[3]["request_id"] is None
    assert out[4]["error"].startswith("label:")
    assert out[16]["error"] == "a row must be a JSON object, not a string"
    assert len(feedback.latest(EP)) == 1


def test_nothing_accepted_writes_nothing(store, feedback):
    out = feedback.record(EP, [{"request_id": "x", "label": 1}], "a", known=everything)
    assert out[0]["status"] == "rejected"
    assert not [a for a in store.list_audit()[0] if a["action"] == "feedback.record"]


def test_latest_filters_by_ids_and_prediction_time(feedback):
    now = time.time()
    early = [new_request_id(now - 7200) for _ in range(3)]
    late = [new_request_id(now - 60) for _ in range(3)]
    feedback.record(EP, [{"request_id": r, "value": 1.0} for r in early + late], "a", known=everything)
    feedback.record("other", [{"request_id": early[0], "value": 9.0}], "a", known=everything)
    assert len(feedback.latest(EP)) == 6 and len(feedback.latest("other")) == 1
    since = datetime.fromtimestamp(now - 600, timezone.utc)
    assert set(feedback.latest(EP, since=since).column("request_id").to_pylist()) == set(late)
    assert set(feedback.latest(EP, until=since).column("request_id").to_pylist()) == set(early)
    subset = feedback.latest(EP, request_ids=[early[1], late[2], new_request_id()])
    assert set(subset.column("request_id").to_pylist()) == {early[1], late[2]}
    assert feedback.latest("nobody").num_rows == 0


def test_id_floor_orders_like_request_ids():
    at = datetime(2026, 12, 3, 7, 0, tzinfo=timezone.utc)
    rid = new_request_id(at.timestamp() + 0.001)
    assert id_floor(at) < rid < id_floor(at + timedelta(milliseconds=2))


# -- the lookup in the log ------------------------------------------------------------------------
def test_known_request_ids_reads_the_partitions_the_ids_point_to(settings):
    root = settings.predlog.root
    now = time.time()
    a, b = new_request_id(now - 7200), new_request_id(now - 60)
    write_log(root, log_rows(a, 3) + log_rows(b))
    write_log(root, log_rows(new_request_id(now - 60)))  # a second file in b's hour
    unlogged_same_hour = new_request_id(now - 60)
    unlogged_no_partition = new_request_id(now - 86400 * 3)
    asked = [a, b, unlogged_same_hour, unlogged_no_partition, "not-an-id"]
    assert known_request_ids(settings, EP, asked) == {a, b}
    assert known_request_ids(settings, "other", asked) == set()
    assert known_request_ids(settings, "../etc", asked) == set()
    assert known_request_ids(settings, EP, []) == set()


def test_an_id_near_an_hour_edge_is_found_in_the_next_hour(settings):
    edge = datetime(2026, 12, 3, 6, 0, tzinfo=timezone.utc)
    rid = new_request_id(edge.timestamp() - 0.002)  # issued at 05:59:59.998, logged at 06:00:00.001
    write_log(settings.predlog.root, log_rows(rid, at=edge + timedelta(milliseconds=1)))
    assert hour_of(request_id_time(rid)) == "2026-12-03T05"
    assert known_request_ids(settings, EP, [rid]) == {rid}


def test_files_being_written_are_not_read(settings):
    rid = new_request_id()
    (path,) = write_log(settings.predlog.root, log_rows(rid))
    Path(path).rename(Path(path).with_name(".inflight.parquet"))
    assert known_request_ids(settings, EP, [rid]) == set()


# -- the join ---------------------------------------------------------------------------------------
def _predictions(rows):
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def _feedback(rows):
    base = {"label": None, "value": None, "reward": None, "actor": "a",
            "timestamp": datetime(2026, 1, 1, tzinfo=timezone.utc), "received_at": datetime(2026, 1, 1, tzinfo=timezone.utc)}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=FEEDBACK_SCHEMA)


def test_join_left_and_inner_on_request_and_instance():
    r1, r2, r3 = (new_request_id() for _ in range(3))
    preds = _predictions(log_rows(r1, 3) + log_rows(r2) + log_rows(r3, 2))
    fb = _feedback([
        {"request_id": r1, "instance": 2, "label": '"b"'},
        {"request_id": r1, "instance": 0, "label": '"a"'},
        {"request_id": r3, "instance": 1, "value": 2.5, "reward": 1.0},
        {"request_id": r2, "instance": 5, "label": '"nowhere"'},  # no such prediction
    ])
    left = join_feedback(preds, fb, how="left")
    assert left.column_names == SCHEMA.names + [
        "feedback_label", "feedback_value", "feedback_reward", "feedback_timestamp", "feedback_received_at",
        "feedback_actor",
    ]
    assert left.select(["request_id", "instance"]).to_pylist() == preds.select(["request_id", "instance"]).to_pylist()
    assert left.column("feedback_label").to_pylist() == ['"a"', None, '"b"', None, None, None]
    assert left.column("feedback_value").to_pylist() == [None] * 5 + [2.5]
    assert left.column("probabilities").to_pylist() == [[0.25, 0.75]] * 6  # list columns carried
    assert left.schema.field("feedback_timestamp").type == pa.timestamp("us", tz="UTC")
    inner = join_feedback(preds, fb, how="inner")
    assert inner.select(["request_id", "instance", "feedback_label"]).to_pylist() == [
        {"request_id": r1, "instance": 0, "feedback_label": '"a"'},
        {"request_id": r1, "instance": 2, "feedback_label": '"b"'},
        {"request_id": r3, "instance": 1, "feedback_label": None},
    ]


def test_join_takes_the_last_row_of_a_key_and_handles_empty_sides():
    rid = new_request_id()
    preds = _predictions(log_rows(rid))
    fb = _feedback([{"request_id": rid, "instance": 0, "reward": 1.0}, {"request_id": rid, "instance": 0, "reward": 2.0}])
    assert join_feedback(preds, fb).column("feedback_reward").to_pylist() == [2.0]
    assert join_feedback(preds, FEEDBACK_SCHEMA.empty_table()).column("feedback_label").to_pylist() == [None]
    assert join_feedback(preds, FEEDBACK_SCHEMA.empty_table(), how="inner").num_rows == 0
    assert join_feedback(SCHEMA.empty_table(), fb).num_rows == 0


def test_join_refuses_bad_arguments():
    preds = _predictions(log_rows(new_request_id()))
    with pytest.raises(InvalidInput, match="'left' or 'inner'"):
        join_feedback(preds, FEEDBACK_SCHEMA.empty_table(), how="outer")
    with pytest.raises(InvalidInput, match="no 'instance' column"):
        join_feedback(preds.drop_columns(["instance"]), FEEDBACK_SCHEMA.empty_table())
    joined = join_feedback(preds, FEEDBACK_SCHEMA.empty_table())
    with pytest.raises(InvalidInput, match="already have"):
        join_feedback(joined, FEEDBACK_SCHEMA.empty_table())


def test_labeled_reads_the_window_dedups_and_joins_the_current_feedback(settings, store, feedback):
    root = settings.predlog.root
    now = datetime.now(timezone.utc).replace(microsecond=0)
    t0 = now - timedelta(hours=5)
    inside = [new_request_id((t0 + timedelta(minutes=50 * i)).timestamp()) for i in range(4)]  # 4 hours
    before = new_request_id((t0 - timedelta(minutes=10)).timestamp())
    after = new_request_id((t0 + timedelta(hours=4)).timestamp())
    rows = [r for rid in inside for r in log_rows(rid, 2)] + log_rows(before) + log_rows(after)
    write_log(root, rows)
    write_log(root, log_rows(inside[0], 2))  # a flush written twice
    feedback.record(EP, [{"request_id": inside[0], "instance": 1, "label": "old"}], "a", known=everything)
    feedback.record(EP, [
        {"request_id": inside[0], "instance": 1, "label": "new"},
        {"request_id": inside[2], "instance": 0, "value": 4.0},
        {"request_id": before, "label": "outside"},
    ], "a", known=everything)

    since, until = t0, t0 + timedelta(hours=4)
    window = read_window(settings, EP, since, until)
    assert window.num_rows == 8 and sorted(set(window.column("request_id").to_pylist())) == sorted(inside)
    got = labeled(settings, store, EP, since, until)
    assert got.select(["request_id", "instance", "feedback_label", "feedback_value"]).to_pylist() == [
        {"request_id": inside[0], "instance": 1, "feedback_label": '"new"', "feedback_value": None},
        {"request_id": inside[2], "instance": 0, "feedback_label": None, "feedback_value": 4.0},
    ]
    everything_left = labeled(settings, feedback, EP, since, until, how="left")
    assert everything_left.num_rows == 8
    assert labeled(settings, store, EP, now + timedelta(days=1), now + timedelta(days=2)).num_rows == 0
    with pytest.raises(InvalidInput, match="must be after"):
        read_window(settings, EP, until, since)


def test_erase_deletes_the_requests_feedback_with_one_audit_record(store, feedback):
    gone, kept = new_request_id(), new_request_id()
    feedback.record(EP, [{"request_id": gone, "label": 1}, {"request_id": gone, "instance": 1, "label": 2},
                         {"request_id": kept, "label": 3}], "a", known=everything)
    feedback.record(EP, [{"request_id": gone, "label": 4}], "a", known=everything)
    feedback.record("other", [{"request_id": gone, "label": 5}], "a", known=everything)
    assert feedback.erase(EP, [gone, "not-an-id"], "dpo") == 3
    assert feedback.history(EP, gone) == [] and len(feedback.history("other", gone)) == 1
    assert feedback.latest(EP).column("request_id").to_pylist() == [kept]
    audit = [a for a in store.list_audit()[0] if a["action"] == "feedback.erase"]
    assert len(audit) == 1 and audit[0]["after"] == {"requests": 2, "rows_deleted": 3} and audit[0]["actor"] == "dpo"
    assert feedback.erase(EP, [gone], "dpo") == 0
