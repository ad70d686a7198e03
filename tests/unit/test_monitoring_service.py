"""The pure parts of a monitor run: log rows -> feature columns (failed requests out, numbers
as floats), duplicates of a record caught mid-compaction dropped once, logged predictions as a
column, and the flat outputs alert rules and retraining policies read."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pyarrow as pa

from app.monitoring.service import _decode_batch, _dedupe, _prediction_column, outputs_of
from app.predlog.layout import SCHEMA


def _log(rows: list[dict]) -> pa.Table:
    base = {"client_request_id": None, "endpoint": "ep", "variant": "", "model": "m", "model_version": "1",
            "protocol": "rest", "probabilities": None, "latency_ms": 1.0, "caller": None, "features": None,
            "timestamp": datetime(2026, 12, 4, tzinfo=timezone.utc)}
    return pa.Table.from_pylist([{**base, **r} for r in rows], schema=SCHEMA)


def test_decode_keeps_successes_and_types_the_features():
    table = _log([
        {"request_id": "a", "instance": 0, "inputs": json.dumps({"age": 31, "city": "Oslo"}), "prediction": "1",
         "status": 200},
        {"request_id": "b", "instance": 0, "inputs": json.dumps({"age": 40.5, "city": "Rome"}), "prediction": "0",
         "status": None},
        {"request_id": "c", "instance": 0, "inputs": json.dumps({"age": 1}), "prediction": None, "status": 503},
        {"request_id": "d", "instance": 0, "inputs": None, "prediction": "1", "status": 200},
    ])
    out = _decode_batch(table, ["age", "city"], ["age"], ["country"])
    assert out.column("__request_id").to_pylist() == ["a", "b", "d"]
    assert out.column("age").type == pa.float64() and out.column("age").to_pylist() == [31.0, 40.5, None]
    assert out.column("city").to_pylist() == ["Oslo", "Rome", None]
    assert out.column("country").null_count == 3  # a segment column no row has


def test_dedupe_drops_a_record_written_twice():
    rows = [{"request_id": r, "instance": i, "inputs": "{}", "prediction": "1", "status": 200}
            for r, i in [("a", 0), ("a", 1), ("a", 0), ("b", 0)]]
    out = _dedupe(_decode_batch(_log(rows), [], [], []))
    assert sorted(zip(out.column("__request_id").to_pylist(), out.column("__instance").to_pylist())) == \
        [("a", 0), ("a", 1), ("b", 0)]


def test_prediction_column_by_kind():
    rows = [{"request_id": str(i), "instance": 0, "inputs": "{}", "prediction": p, "status": 200}
            for i, p in enumerate(['"setosa"', "2", "0.75", None])]
    table = _decode_batch(_log(rows), [], [], [])
    assert _prediction_column(table.slice(0, 1), "categorical").to_pylist() == ["setosa"]
    assert _prediction_column(table.slice(1), "numeric").to_pylist() == [2.0, 0.75, None]


def test_outputs_flatten_what_rules_read():
    drift = {"dataset_drift": {"detected": True, "share": 0.5, "drifted": 1, "columns": 2, "threshold": 0.5},
             "columns": {"age": {"drifted": True}, "city": {"drifted": False}, "gone": {"drifted": False, "error": "x"}}}
    perf = {"labelled_rows": 40, "overall": {"accuracy": {"value": 0.8}, "roc_auc": {"value": None}},
            "estimated": {"accuracy": {"value": 0.82}}}
    segments = {"country": {"FR": {"dataset_drift": {"detected": True}}, "DE": {"dataset_drift": {"detected": False}}}}
    out = outputs_of(100, drift, {"drifted": False}, segments, perf, 3)
    assert out == {"rows": 100, "drift.dataset": True, "drift.share": 0.5, "drift.feature[age]": True,
                   "drift.feature[city]": False, "drift.prediction": False, "drift.segment[country=FR]": True,
                   "drift.segment[country=DE]": False, "labels.rows": 40, "performance.accuracy": 0.8,
                   "estimated.accuracy": 0.82, "predlog.drops": 3}
    assert outputs_of(5, None, None, {}, None, None) == {"rows": 5}
