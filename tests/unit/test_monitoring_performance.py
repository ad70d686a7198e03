"""Measured performance with confidence intervals, and CBPE (app.monitoring.performance):
metric values against sklearn.metrics, the Wilson interval against its published example, CBPE
by simulation, and the report over a real joined table (app.predlog.join.join_feedback)."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest
from sklearn import metrics as skm

from app.errors import InvalidInput
from app.monitoring.performance import (
    class_key,
    estimate_cbpe,
    measured_metrics,
    performance_report,
    wilson_interval,
)
from app.predlog.feedback import FEEDBACK_SCHEMA
from app.predlog.join import join_feedback
from app.predlog.layout import SCHEMA


def test_wilson_interval_matches_newcombe_1998():
    # Newcombe (1998), Statistics in Medicine 17:857, table I: 81/263, Wilson score 0.2553..0.3662
    lo, hi = wilson_interval(81, 263, 0.95)
    assert round(lo, 4) == 0.2553 and round(hi, 4) == 0.3662


def test_class_keys_compare_like_same_label():
    assert class_key(1) == class_key(1.0) == class_key([1]) == "n:1"
    assert class_key("1") != class_key(1)
    assert class_key(True) != class_key(1)
    assert class_key(0.5) == "n:0.5" and class_key(None) is None


def _binary_sample(n=2000, seed=1):
    rng = np.random.default_rng(seed)
    p1 = rng.beta(2, 2, n)
    y = (rng.random(n) < p1).astype(int)
    pred = (p1 > 0.5).astype(int)
    return y, pred, np.column_stack([1 - p1, p1])


def test_binary_metrics_match_sklearn_with_intervals_around_them():
    y, pred, probs = _binary_sample()
    out = measured_metrics(y, pred, task="classification", classes=[0, 1], probabilities=probs, bootstrap=300)
    assert out["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["f1"]["value"] == pytest.approx(skm.f1_score(y, pred, pos_label=1))
    assert out["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
    assert out["log_loss"]["value"] == pytest.approx(skm.log_loss(y, probs), rel=1e-9)
    for name, entry in out.items():
        lo, hi = entry["ci"]
        assert lo < entry["value"] < hi, name
        assert hi - lo < 0.1, name
        assert entry["n"] == y.size


def test_positive_class_is_the_second_class():
    y, pred, probs = _binary_sample()
    labels = np.array(["no", "yes"])
    out = measured_metrics(labels[y], labels[pred], task="classification", classes=["yes", "no"],
                           probabilities=probs[:, ::-1])
    assert out["f1"]["value"] == pytest.approx(skm.f1_score(y, pred, pos_label=0))
    assert out["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(1 - y, probs[:, 0]))


def test_multiclass_metrics_match_sklearn():
    rng = np.random.default_rng(3)
    n, k = 3000, 4
    logits = rng.normal(size=(n, k)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in probs])
    pred = probs.argmax(axis=1)
    classes = ["a", "b", "c", "d"]
    names = np.array(classes)
    out = measured_metrics(names[y], names[pred], task="classification", classes=classes, probabilities=probs,
                           bootstrap=200)
    assert out["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, pred))
    assert out["f1"]["value"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert out["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"))
    assert out["log_loss"]["value"] == pytest.approx(skm.log_loss(y, probs), rel=1e-9)
    assert all(e["ci"][0] <= e["value"] <= e["ci"][1] for e in out.values())


def test_ties_in_scores_count_half_like_sklearn():
    y = np.array([0, 1, 0, 1, 1, 0, 1, 0])
    p1 = np.array([0.5, 0.5, 0.2, 0.8, 0.5, 0.5, 0.9, 0.1])
    out = measured_metrics(y, (p1 > 0.5).astype(int), task="classification", classes=[0, 1],
                           probabilities=np.column_stack([1 - p1, p1]), bootstrap=50)
    assert out["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, p1))


def test_bootstrap_interval_covers_the_truth_about_as_often_as_it_says():
    """Coverage check of the percentile bootstrap for F1 against a large population's F1."""
    y_pop, pred_pop, _ = _binary_sample(n=200_000, seed=9)
    truth = skm.f1_score(y_pop, pred_pop)
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(100):
        idx = rng.integers(0, y_pop.size, 400)
        ci = measured_metrics(y_pop[idx], pred_pop[idx], task="classification", classes=[0, 1], bootstrap=300,
                              seed=trial)["f1"]["ci"]
        hits += ci[0] <= truth <= ci[1]
    assert 85 <= hits <= 100


def test_regression_metrics_match_sklearn():
    rng = np.random.default_rng(2)
    y = rng.normal(10, 3, 1500)
    yhat = y + rng.normal(0.5, 1, y.size)
    out = measured_metrics(y, yhat, task="regression", bootstrap=300)
    assert out["rmse"]["value"] == pytest.approx(np.sqrt(skm.mean_squared_error(y, yhat)))
    assert out["mae"]["value"] == pytest.approx(skm.mean_absolute_error(y, yhat))
    assert out["r2"]["value"] == pytest.approx(skm.r2_score(y, yhat))
    for entry in out.values():
        assert entry["ci"][0] < entry["value"] < entry["ci"][1] and entry["n"] == y.size


def test_bad_inputs_are_refused_with_the_fix():
    with pytest.raises(InvalidInput, match="task"):
        measured_metrics([1], [1], task="ranking")
    with pytest.raises(InvalidInput, match="bootstrap"):
        measured_metrics([1], [1], task="classification", bootstrap=-1)
    with pytest.raises(InvalidInput, match="one column per class"):
        measured_metrics([0, 1], [0, 1], task="classification", classes=[0, 1], probabilities=np.ones((2, 3)))
    assert measured_metrics([], [], task="classification", classes=[0, 1]) == {}


# -- CBPE -----------------------------------------------------------------------------------------
def _holdout(probs, y, pred, classes):
    return {"labels": [classes[i] for i in y], "predictions": [classes[i] for i in pred],
            "probabilities": probs.tolist()}


def test_cbpe_estimates_accuracy_of_a_calibrated_model_under_covariate_shift():
    rng = np.random.default_rng(5)

    def sample(n, a, b):  # a calibrated model: the label is drawn from the model's own probability
        p1 = rng.beta(a, b, n)
        return np.column_stack([1 - p1, p1]), (rng.random(n) < p1).astype(int)

    ref_p, ref_y = sample(3000, 2, 2)
    cal = _holdout(ref_p, ref_y, ref_p.argmax(1), [0, 1])
    cur_p, cur_y = sample(20_000, 0.6, 0.6)  # shifted: more confident rows, accuracy rises
    realized = float((cur_p.argmax(1) == cur_y).mean())
    ref_accuracy = float((ref_p.argmax(1) == ref_y).mean())
    assert realized - ref_accuracy > 0.05  # the shift moved accuracy
    est = estimate_cbpe(cur_p, classes=[0, 1], calibration=cal)
    assert abs(est["accuracy"]["value"] - realized) < 0.02
    lo, hi = est["accuracy"]["ci"]
    assert lo < est["accuracy"]["value"] < hi and hi - lo < 0.02
    realized_f1 = skm.f1_score(cur_y, cur_p.argmax(1))
    assert abs(est["f1"]["value"] - realized_f1) < 0.03
    assert est["f1"]["ci"][0] <= est["f1"]["value"] <= est["f1"]["ci"][1]


def test_cbpe_calibration_fixes_an_overconfident_model():
    rng = np.random.default_rng(6)

    def sample(n, a, b):
        true_p1 = rng.beta(a, b, n)
        y = (rng.random(n) < true_p1).astype(int)
        shown = 1 / (1 + np.exp(-3 * np.log(true_p1 / (1 - true_p1))))  # overconfident scores
        return np.column_stack([1 - shown, shown]), y

    ref_p, ref_y = sample(5000, 2, 2)
    cur_p, cur_y = sample(20_000, 1, 3)
    realized = float((cur_p.argmax(1) == cur_y).mean())
    naive = float(cur_p.max(1).mean())  # the raw confidence overstates accuracy
    assert naive - realized > 0.05
    est = estimate_cbpe(cur_p, classes=[0, 1], calibration=_holdout(ref_p, ref_y, ref_p.argmax(1), [0, 1]))
    assert abs(est["accuracy"]["value"] - realized) < 0.02


def test_cbpe_multiclass_accuracy():
    rng = np.random.default_rng(7)

    def sample(n, scale):
        logits = rng.normal(size=(n, 3)) * scale
        p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        y = (rng.random((n, 1)) > np.cumsum(p, 1)).sum(1)
        return p, y

    ref_p, ref_y = sample(4000, 1.5)
    cur_p, cur_y = sample(20_000, 3.0)
    est = estimate_cbpe(cur_p, classes=["x", "y", "z"],
                        calibration=_holdout(ref_p, ref_y, ref_p.argmax(1), ["x", "y", "z"]))
    assert abs(est["accuracy"]["value"] - float((cur_p.argmax(1) == cur_y).mean())) < 0.03
    assert abs(est["f1"]["value"] - skm.f1_score(cur_y, cur_p.argmax(1), average="macro")) < 0.05


def test_cbpe_refuses_a_holdout_without_probabilities():
    with pytest.raises(InvalidInput, match="probabilities"):
        estimate_cbpe(np.full((3, 2), 0.5), classes=[0, 1], calibration={"labels": [0, 1], "probabilities": None})


# -- the report over a joined window --------------------------------------------------------------
T0 = datetime(2026, 12, 3, 7, 0, tzinfo=timezone.utc)


def _joined(n, *, seed=11, labelled_share=0.5, variants=("a", "b")):
    rng = np.random.default_rng(seed)
    p1 = rng.beta(0.8, 0.8, n)
    y = (rng.random(n) < p1).astype(int)
    pred = (p1 > 0.5).astype(int)
    classes = ["neg", "pos"]
    status = np.where(rng.random(n) < 0.02, 500, 200)
    predictions = pa.table({
        "request_id": [f"{i:032x}" for i in range(n)],
        "instance": pa.array(np.zeros(n, dtype=np.int32)),
        "client_request_id": pa.nulls(n, pa.string()),
        "timestamp": pa.array([T0 + timedelta(seconds=int(s)) for s in np.linspace(0, 7199, n)],
                              pa.timestamp("us", tz="UTC")),
        "endpoint": ["ep"] * n,
        "variant": [variants[i % len(variants)] for i in range(n)],
        "model": ["m"] * n, "model_version": ["1"] * n, "protocol": ["v2"] * n,
        "inputs": pa.nulls(n, pa.string()),
        "prediction": [None if s >= 400 else json.dumps(classes[c]) for c, s in zip(pred, status)],
        "probabilities": [None if s >= 400 else [float(1 - q), float(q)] for q, s in zip(p1, status)],
        "latency_ms": np.ones(n),
        "caller": pa.nulls(n, pa.string()),
        "status": pa.array(status.astype(np.int16)),
        "features": pa.nulls(n, pa.string()),
    }, schema=SCHEMA)
    labelled = np.flatnonzero(rng.random(n) < labelled_share)
    feedback = pa.table({
        "request_id": [f"{i:032x}" for i in labelled],
        "instance": pa.array(np.zeros(labelled.size, dtype=np.int32)),
        "label": [json.dumps(classes[y[i]]) for i in labelled],
        "value": pa.nulls(labelled.size, pa.float64()),
        "reward": pa.nulls(labelled.size, pa.float64()),
        "timestamp": [T0] * labelled.size, "received_at": [T0] * labelled.size, "actor": ["t"] * labelled.size,
    }, schema=FEEDBACK_SCHEMA)
    joined = join_feedback(predictions, feedback)
    region = pa.array([["eu", "us", "apac"][i % 3] for i in range(n)])
    return joined.append_column("region", region), y, pred, status, labelled, p1


def _calibration(seed=12, n=3000):
    rng = np.random.default_rng(seed)
    p1 = rng.beta(2, 2, n)
    y = (rng.random(n) < p1).astype(int)
    return _holdout(np.column_stack([1 - p1, p1]), y, (p1 > 0.5).astype(int), ["neg", "pos"])


def test_report_over_a_joined_window():
    joined, y, pred, status, labelled, _ = _joined(6000)
    report = performance_report(joined, task="classification", classes=["neg", "pos"], calibration=_calibration(),
                                segments=["region"], bucket_s=3600, bootstrap=200)
    ok = status < 400
    mask = np.zeros(y.size, dtype=bool)
    mask[labelled] = True
    mask &= ok
    assert report["rows"] == int(ok.sum()) and report["labelled_rows"] == int(mask.sum())
    overall = report["overall"]
    assert overall["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y[mask], pred[mask]))
    assert overall["f1"]["value"] == pytest.approx(skm.f1_score(y[mask], pred[mask]))
    assert overall["accuracy"]["n"] == mask.sum()
    assert set(report["variants"]) == {"a", "b"}
    a = np.arange(y.size) % 2 == 0
    assert report["variants"]["a"]["metrics"]["accuracy"]["value"] == pytest.approx(
        skm.accuracy_score(y[mask & a], pred[mask & a]))
    assert set(report["segments"]["region"]) == {"eu", "us", "apac"}
    assert [b["start"] for b in report["buckets"]] == ["2026-12-03T07:00:00+00:00", "2026-12-03T08:00:00+00:00"]
    assert sum(b["rows"] for b in report["buckets"]) == report["rows"]
    assert all(b["estimated"]["accuracy"]["value"] > 0.5 for b in report["buckets"])
    est = report["estimated"]["accuracy"]
    assert est["ci"][0] < est["value"] < est["ci"][1]
    comparison = report["comparison"]["accuracy"]
    assert comparison["measured"] == overall["accuracy"]["value"]
    assert comparison["abs_error"] < 0.03  # the labels follow the model's probabilities: the estimate holds
    json.dumps(report)  # JSON-serializable as a run's result


def test_report_min_rows_and_no_calibration():
    joined, *_ = _joined(300, labelled_share=0.05, variants=("",))
    report = performance_report(joined, task="classification", classes=["neg", "pos"], calibration=None,
                                segments=["region"], min_rows=20, bootstrap=50)
    assert report["estimated"] is None and report["comparison"] == {}
    assert report["variants"] == {}  # one unnamed variant
    assert all(s["metrics"] == {} for s in report["segments"]["region"].values())  # under min_rows each


def test_report_regression_uses_feedback_values():
    n = 500
    rng = np.random.default_rng(4)
    truth = rng.normal(size=n)
    yhat = truth + rng.normal(scale=0.3, size=n)
    joined = pa.table({
        "timestamp": pa.array([T0] * n, pa.timestamp("us", tz="UTC")),
        "variant": ["v"] * n,
        "prediction": [json.dumps([float(v)]) for v in yhat],
        "probabilities": pa.nulls(n, pa.list_(pa.float64())),
        "status": pa.array(np.full(n, 200, dtype=np.int16)),
        "feedback_label": pa.nulls(n, pa.string()),
        "feedback_value": pa.array([None if i % 5 == 0 else float(truth[i]) for i in range(n)], pa.float64()),
    })
    report = performance_report(joined, task="regression", classes=None, calibration=None, bootstrap=100)
    keep = np.arange(n) % 5 != 0
    assert report["labelled_rows"] == keep.sum()
    assert report["overall"]["rmse"]["value"] == pytest.approx(np.sqrt(skm.mean_squared_error(truth[keep], yhat[keep])))
    assert report["estimated"] is None


def test_report_is_fast_on_100k_rows():
    joined, *_ = _joined(100_000, labelled_share=0.3)
    started = time.perf_counter()
    report = performance_report(joined, task="classification", classes=["neg", "pos"], calibration=_calibration(),
                                segments=["region"], bucket_s=900)
    elapsed = time.perf_counter() - started
    assert report["rows"] > 95_000 and len(report["buckets"]) == 8
    assert elapsed < 30, elapsed


def test_report_reads_a_table_of_many_chunks_like_one():
    joined, *_ = _joined(1200)
    chunked = pa.concat_tables([joined.slice(0, 500), joined.slice(500, 300), joined.slice(800)])
    assert chunked.column("prediction").num_chunks == 3
    kwargs = dict(task="classification", classes=["neg", "pos"], calibration=_calibration(), bootstrap=50)
    assert performance_report(chunked, **kwargs) == performance_report(joined.combine_chunks(), **kwargs)


def test_calibration_holdout_with_its_own_class_order():
    rng = np.random.default_rng(8)
    p1 = rng.beta(2, 2, 2000)
    y = (rng.random(p1.size) < p1).astype(int)
    probs = np.column_stack([1 - p1, p1])
    in_order = _holdout(probs, y, probs.argmax(1), ["neg", "pos"]) | {"classes": ["neg", "pos"]}
    swapped = _holdout(probs[:, ::-1], y, probs.argmax(1), ["neg", "pos"]) | {"classes": ["pos", "neg"]}
    current = np.column_stack([1 - rng.beta(1, 3, 500), rng.beta(1, 3, 500)])
    a = estimate_cbpe(current, classes=["neg", "pos"], calibration=in_order)
    b = estimate_cbpe(current, classes=["neg", "pos"], calibration=swapped)
    assert a["accuracy"] == b["accuracy"]
    with pytest.raises(InvalidInput, match="not the model's classes"):
        estimate_cbpe(current, classes=["neg", "pos"], calibration=in_order | {"classes": ["neg", "maybe"]})
