"""The shadow report (app.traffic.shadow): primary and shadow answers paired by prediction,
agreement or distance, latency and errors side by side, and quality once labels arrive."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pytest

from app.predlog.feedback import FEEDBACK_SCHEMA
from app.predlog.layout import SCHEMA
from app.traffic.shadow import infer_task, shadow_report

AT = datetime(2026, 12, 4, 10, tzinfo=timezone.utc)


def log(rows: list[tuple]) -> pa.Table:
    """(request_id, instance, prediction, latency_ms, status, variant) -> a table in the log's schema."""
    return pa.Table.from_pylist(
        [
            {"request_id": rid, "instance": inst, "timestamp": AT, "endpoint": "e", "variant": variant or "",
             "model": "m", "model_version": "1", "protocol": "rest",
             "prediction": None if pred is None else json.dumps(pred), "latency_ms": latency, "status": status}
            for rid, inst, pred, latency, status, variant in rows
        ],
        schema=SCHEMA,
    )


def feedback(rows: list[tuple]) -> pa.Table:
    """(request_id, instance, label, value) -> a FeedbackStore.latest table."""
    return pa.Table.from_pylist(
        [
            {"request_id": rid, "instance": inst, "label": None if label is None else json.dumps(label),
             "value": value, "reward": None, "timestamp": AT, "received_at": AT, "actor": "t"}
            for rid, inst, label, value in rows
        ],
        schema=FEEDBACK_SCHEMA,
    )


def test_classification_agreement_latency_errors_and_accuracy():
    primary = log([
        ("r1", 0, "yes", 10.0, None, "a"),  # an old file: null status = 200
        ("r1", 1, "no", 12.0, 200, "a"),
        ("r2", 0, "yes", 14.0, 200, "b"),
        ("r3", 0, None, 16.0, 503, "a"),  # the primary failed
        ("r4", 0, "no", 18.0, 200, "a"),  # not copied to the shadow
    ])
    shadow = log([
        ("r1", 0, "yes", 30.0, 200, "v7"),
        ("r1", 1, "yes", 40.0, 200, "v7"),
        ("r2", 0, "yes", 50.0, 200, "v7"),
        ("r3", 0, "no", 60.0, 200, "v7"),
        ("r9", 0, "no", 70.0, 200, "v7"),  # its primary row is outside the window
        ("r1", 0, None, 5.0, 500, "broken"),
        ("r2", 0, None, 5.0, 500, "broken"),
    ])
    labels = feedback([("r1", 0, "yes", None), ("r1", 1, "no", None), ("r2", 0, "no", None), ("r3", 0, "no", None)])
    report = shadow_report(primary, shadow, task=None, feedback=labels)
    json.dumps(report, allow_nan=False)  # JSON as it is
    assert report["task"] == "classification" and report["primary"] == {"n": 5}
    v7 = report["shadows"]["v7"]
    assert v7["n_shadow"] == 5 and v7["n_compared"] == 4 and v7["n_both_answered"] == 3
    assert v7["agreement"] == pytest.approx(2 / 3)
    assert v7["latency_ms"]["primary"]["p50"] == pytest.approx(np.percentile([10, 12, 14, 16], 50))
    assert v7["latency_ms"]["shadow"] == {"p50": 45.0, "p95": pytest.approx(np.percentile([30, 40, 50, 60], 95)),
                                          "mean": 45.0}
    assert v7["error_rate"] == {"primary": 0.25, "shadow": 0.0}
    q = v7["quality"]
    assert q["metric"] == "accuracy" and q["n_labelled"] == 3  # r3: the primary did not answer
    assert q["primary"]["accuracy"] == pytest.approx(2 / 3) and q["shadow"]["accuracy"] == pytest.approx(1 / 3)
    broken = report["shadows"]["broken"]
    assert broken["error_rate"] == {"primary": 0.0, "shadow": 1.0}
    assert broken["agreement"] is None and broken["quality"]["primary"]["accuracy"] is None
    assert broken["mean_abs_diff"] is None


def test_regression_distance_and_rmse():
    primary = log([("r1", 0, 1.5, 1.0, 200, ""), ("r2", 0, 2.0, 1.0, 200, ""), ("r3", 0, 3.25, 1.0, 200, "")])
    shadow = log([("r1", 0, 1.0, 2.0, 200, "s"), ("r2", 0, 2.0, 2.0, 200, "s"), ("r3", 0, 4.25, 2.0, 200, "s")])
    labels = feedback([("r1", 0, None, 1.0), ("r2", 0, None, 3.0), ("r3", 0, "ignored", None)])
    report = shadow_report(primary, shadow, task=None, feedback=labels)
    assert report["task"] == "regression"
    s = report["shadows"]["s"]
    assert s["mean_abs_diff"] == pytest.approx((0.5 + 0 + 1.0) / 3) and s["max_abs_diff"] == 1.0
    q = s["quality"]
    assert q["metric"] == "rmse" and q["n_labelled"] == 2
    assert q["primary"]["rmse"] == pytest.approx(np.sqrt((0.5**2 + 1.0**2) / 2))
    assert q["primary"]["mae"] == pytest.approx(0.75)
    assert q["shadow"]["rmse"] == pytest.approx(np.sqrt((0 + 1.0) / 2)) and q["shadow"]["mae"] == pytest.approx(0.5)


def test_empty_inputs_and_no_feedback():
    report = shadow_report(SCHEMA.empty_table(), SCHEMA.empty_table(), task="regression")
    assert report == {"task": "regression", "primary": {"n": 0}, "shadows": {}}
    primary = log([("r1", 0, 1, 1.0, 200, "")])
    shadow = log([("r1", 0, 1.0, 1.0, 200, "s")])
    report = shadow_report(primary, shadow, task="classification")
    s = report["shadows"]["s"]
    assert s["agreement"] == 1.0  # class id 1 and 1.0: the same answer
    assert s["quality"] == {"metric": "accuracy", "n_labelled": 0, "primary": {"accuracy": None},
                            "shadow": {"accuracy": None}}
    with pytest.raises(ValueError):
        shadow_report(primary, shadow, task="ranking")


def test_infer_task():
    assert infer_task(["a", "b"]) == "classification"
    assert infer_task([0, 1, 2]) == "classification"
    assert infer_task([True, False]) == "classification"
    assert infer_task([1.0, 2.5]) == "regression"
    assert infer_task([]) == "classification"
