"""Reference profiles: kinds, counts, the quantile sketch against numpy, JSON-ability."""

import json
import time

import numpy as np
import pyarrow as pa
import pytest

from app.errors import InvalidInput
from app.monitoring.profile import add_predictions, build_profile, category_key, column_profile


def test_category_key():
    assert category_key(1) == "1"
    assert category_key(1.0) == "1"
    assert category_key(np.float32(2.0)) == "2"
    assert category_key(np.int64(-3)) == "-3"
    assert category_key(0.5) == "0.5"
    assert category_key(0.1) == "0.1"
    assert category_key(True) == "True"
    assert category_key(np.bool_(False)) == "False"
    assert category_key("a") == "a"
    assert category_key(b"x") == "x"


def _table(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=n)
    x[:7] = np.nan
    return pa.table({
        "x": x,
        "i": rng.integers(0, 4, n),
        "b01": rng.integers(0, 2, n).astype(np.float64),
        "s": pa.array(rng.choice(["a", "b", "c"], n).tolist()),
        "flag": rng.random(n) < 0.3,
        "code": rng.integers(100, 110, n),
        "d": pa.array(rng.choice(["u", "v", "w"], n).tolist()).dictionary_encode(),
        "withnull": pa.array([None if k % 10 == 0 else float(k % 13) for k in range(n)]),
    })


def test_kinds_and_counts():
    t = _table()
    p = build_profile(t, categorical=["code"], quantiles=100, exact_rows=1000, source={"uri": "mem"})
    f = p["features"]
    assert p["rows"] == 3000 and p["format"] == 1 and p["source"] == {"uri": "mem"}
    assert list(f) == t.column_names
    assert f["x"]["kind"] == "numeric" and f["x"]["missing"] == 7 and f["x"]["count"] == 2993
    assert f["x"]["values"] is None and f["x"]["categories"] is None  # 2993 > exact_rows, continuous
    assert f["i"]["kind"] == "numeric" and f["i"]["n_unique"] == 4
    assert set(f["i"]["categories"]) == {"0", "1", "2", "3"}
    assert f["b01"]["kind"] == "binary" and set(f["b01"]["categories"]) == {"0", "1"}
    assert "mean" in f["b01"]  # a numeric binary keeps its moments
    assert f["s"]["kind"] == "categorical" and sum(f["s"]["categories"].values()) == 3000
    assert f["flag"]["kind"] == "binary" and set(f["flag"]["categories"]) == {"True", "False"}
    assert f["code"]["kind"] == "categorical" and "mean" not in f["code"]
    assert set(f["code"]["categories"]) == {str(k) for k in range(100, 110)}
    assert f["d"]["kind"] == "categorical" and set(f["d"]["categories"]) == {"u", "v", "w"}
    assert f["withnull"]["missing"] == 300 and f["withnull"]["count"] == 2700
    json.dumps(p, allow_nan=False)


def test_numeric_moments_and_sketch_match_numpy():
    rng = np.random.default_rng(1)
    x = rng.lognormal(size=5000)
    p = column_profile(x, quantiles=1000)
    assert p["quantiles"] == pytest.approx(np.quantile(x, np.linspace(0, 1, 1001)).tolist(), rel=1e-12)
    assert p["std"] == pytest.approx(np.std(x, ddof=1))  # pandas' std
    assert p["mean"] == pytest.approx(x.mean())
    assert (p["min"], p["max"]) == (x.min(), x.max())
    small = column_profile(x[:500], exact_rows=1000)
    assert small["values"] == sorted(x[:500].tolist())


def test_inf_counts_as_missing_and_empty_column():
    p = column_profile(np.array([1.0, np.inf, -np.inf, np.nan, 2.0, 3.0]))
    assert p["count"] == 3 and p["missing"] == 3
    e = column_profile(np.array([np.nan, np.nan]))
    assert e["count"] == 0 and e["missing"] == 2
    json.dumps(e, allow_nan=False)


def test_n_unique_capped_and_categories_truncated():
    vals = pa.array([f"k{i % 50}" for i in range(1000)])
    p = column_profile(vals, max_categories=10)
    assert p["n_unique"] == 11 and len(p["categories"]) == 10 and p["categories_truncated"]
    num = column_profile(np.arange(100, dtype=float), max_categories=10)
    assert num["n_unique"] == 11 and num["categories"] is None


def test_categorical_unknown_column_refused():
    with pytest.raises(InvalidInput, match="nope"):
        build_profile(_table(10), categorical=["nope"])


def test_add_predictions():
    rng = np.random.default_rng(2)
    p = build_profile(_table(200))
    probs = rng.dirichlet([1, 1, 1], size=200)
    preds = np.array(["a", "b", "c"])[probs.argmax(1)]
    add_predictions(p, task="classification", classes=["a", "b", "c"], predictions=preds,
                    labels=preds, probabilities=probs, holdout_rows=50)
    assert p["prediction"]["kind"] == "categorical"
    assert sum(p["prediction"]["categories"].values()) == 200
    assert len(p["holdout"]["labels"]) == 50 and len(p["holdout"]["probabilities"][0]) == 3
    json.dumps(p, allow_nan=False)
    add_predictions(p, task="regression", classes=None, predictions=rng.normal(size=200),
                    labels=rng.normal(size=200))
    assert p["prediction"]["kind"] == "numeric" and p["holdout"]["probabilities"] is None
    with pytest.raises(InvalidInput, match="columns but 2 classes"):
        add_predictions(p, task="classification", classes=["a", "b"], predictions=preds,
                        labels=preds, probabilities=probs)


def test_wide_profile_is_fast():
    """300k x 1000 must profile well under a minute; 300k x 50 here (a twentieth) in a few s."""
    rng = np.random.default_rng(3)
    t = pa.table({f"c{i}": rng.normal(size=300_000) for i in range(50)})
    t0 = time.perf_counter()
    p = build_profile(t)
    assert time.perf_counter() - t0 < 10
    assert len(p["features"]) == 50
