"""Reference profiles: what the drift tests need to know about the training data, kept small.

A profile is made once, when a model version is registered, and stored as a JSON artifact of
the version (``format: 1``, described in docs/monitoring.md, "Formats"). Drift runs then compare each
window of logged requests with the profile instead of re-reading the training set.

Per feature it keeps: counts (non-missing, missing, distinct), and for numeric columns the
moments, a quantile sketch of ``quantiles + 1`` points (plus ``tail_means``, the means of the
lowest and highest ``count / quantiles`` values: an addition to format 1 that the drift module
uses where present) and, for small references
(``count <= exact_rows``), every value; for categorical columns (and numeric columns with at
most ``max_categories`` distinct values) the count of each category. With those, the tests
Evidently picks by default are exact on small references (KS needs the raw values) and on
discrete columns (chi-square, z, binned distances need counts only); on large continuous
columns the drift module approximates from the sketch (documented there).

Missing means null or NaN; +-inf is treated as missing too, because Evidently drops +-inf with
the NaNs before testing a column (``replace([-inf, inf], nan).dropna()``), and so does drift.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.errors import InvalidInput

FORMAT = 1
KINDS = ("numeric", "categorical", "binary")


def category_key(value: Any) -> str:
    """The string a value is counted under in ``categories``: integral numbers as ints
    (``"1"``, not ``"1.0"``), other floats as Python prints them, bools as ``"True"``/``"False"``,
    bytes decoded as UTF-8, anything else ``str(value)``. Profile and drift both key by it, so
    a reference int 1 and a logged JSON float 1.0 fall in the same category."""
    if isinstance(value, (bool, np.bool_)):
        return "True" if value else "False"
    if isinstance(value, (np.integer, int)):
        return str(int(value))
    if isinstance(value, (np.floating, float)):
        f = float(value)
        if math.isfinite(f) and f.is_integer():
            return str(int(f))
        return repr(f)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _finite_float(x: float) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def _is_categorical_type(t: pa.DataType) -> bool:
    return (pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_boolean(t)
            or pa.types.is_dictionary(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t))


def _as_array(values: np.ndarray | pa.Array | pa.ChunkedArray | list) -> pa.Array | pa.ChunkedArray:
    if isinstance(values, (pa.Array, pa.ChunkedArray)):
        return values
    arr = np.asarray(values)
    if arr.dtype.kind == "O":
        return pa.array(list(arr), from_pandas=True)
    return pa.array(arr, from_pandas=True)


def numeric_values(values: np.ndarray | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Float64 non-missing values (null, NaN and +-inf dropped) and the number dropped."""
    if isinstance(values, np.ndarray) and values.dtype.kind in "fiub":
        x = values.astype(np.float64, copy=False)
    else:
        arr = _as_array(values)
        if isinstance(arr, pa.ChunkedArray):
            arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
        if pa.types.is_dictionary(arr.type):
            arr = arr.dictionary_decode()
        if not (pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type)
                or pa.types.is_boolean(arr.type) or pa.types.is_null(arr.type)):
            raise InvalidInput(f"column of type {arr.type} is not numeric; declare it categorical")
        x = pc.cast(arr, pa.float64()).to_numpy(zero_copy_only=False)
    ok = np.isfinite(x)
    n_bad = int(x.size - np.count_nonzero(ok))
    return (x[ok] if n_bad else x), n_bad


def category_values(values: np.ndarray | pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """Non-missing values as category keys (object array of str) and the number of missing."""
    arr = _as_array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    n = len(arr)
    if pa.types.is_floating(arr.type):
        arr = pc.if_else(pc.is_finite(arr), arr, pa.scalar(None, arr.type))
    arr = arr.drop_null()
    missing = n - len(arr)
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        return arr.to_numpy(zero_copy_only=False).astype(object), missing
    # few distinct values: key each distinct value once, then map
    vc = pc.value_counts(arr)
    uniq = vc.field("values")
    keys = np.array([category_key(v) for v in uniq.to_pylist()], dtype=object)
    idx = pc.index_in(arr, value_set=uniq).to_numpy(zero_copy_only=False)
    return keys[idx], missing


def _counts_from_arrow(arr: pa.Array) -> dict[str, int]:
    vc = pc.value_counts(arr)
    out: dict[str, int] = {}
    for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            continue
        k = category_key(v)
        out[k] = out.get(k, 0) + int(c)
    return out


def _categorical_profile(values, *, max_categories: int) -> dict:
    arr = _as_array(values)
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks() if arr.num_chunks != 1 else arr.chunk(0)
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    n = len(arr)
    counts = _counts_from_arrow(arr)
    count = int(sum(counts.values()))
    n_unique = len(counts)
    prof: dict[str, Any] = {
        "kind": "binary" if n_unique <= 2 else "categorical",
        "count": count, "missing": int(n - count),
        "n_unique": min(n_unique, max_categories + 1),
    }
    if n_unique > max_categories:
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:max_categories]
        prof["categories"] = dict(top)
        prof["categories_truncated"] = True
    else:
        prof["categories"] = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return prof


def _quantiles_sorted(xs: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``np.quantile(xs, probs)`` (linear, numpy's default) on an already sorted array."""
    pos = probs * (xs.size - 1)
    lo = np.floor(pos).astype(np.int64)
    hi = np.minimum(lo + 1, xs.size - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def _numeric_profile(x: np.ndarray, missing: int, *, quantiles: int, exact_rows: int,
                     max_categories: int) -> dict:
    n = int(x.size)
    prof: dict[str, Any] = {"kind": "numeric", "count": n, "missing": int(missing)}
    if n == 0:
        prof.update(n_unique=0, min=None, max=None, mean=None, std=None, quantiles=None,
                    values=[], categories={})
        return prof
    xs = np.sort(x)
    change = np.flatnonzero(xs[1:] != xs[:-1]) + 1
    n_unique = int(change.size + 1)
    mean = float(xs.mean())
    std = float(xs.std(ddof=1)) if n > 1 else 0.0
    prof.update(
        n_unique=min(n_unique, max_categories + 1),
        min=float(xs[0]), max=float(xs[-1]), mean=mean, std=std,
        quantiles=_quantiles_sorted(xs, np.linspace(0.0, 1.0, quantiles + 1)).tolist(),
        values=xs.tolist() if n <= exact_rows else None,
    )
    # Mean of the lowest and of the highest n/quantiles values: the extreme bands of the sketch
    # span [min, q_1] and [q_Q-1, max], which on heavy tails are wide and far from linear; their
    # means let drift shape the quantile function there (drift._tail_exponents).
    k = max(1, int(round(n / quantiles)))
    prof["tail_means"] = [float(xs[:k].mean()), float(xs[-k:].mean())]
    if n_unique <= max_categories:
        starts = np.concatenate(([0], change))
        counts = np.diff(np.concatenate((starts, [n])))
        prof["categories"] = {category_key(v): int(c) for v, c in zip(xs[starts].tolist(), counts.tolist())}
    else:
        prof["categories"] = None
    if n_unique <= 2:
        prof["kind"] = "binary"
    return prof


def column_profile(values: np.ndarray | pa.Array | pa.ChunkedArray, *, kind: str | None = None,
                   quantiles: int = 1000, exact_rows: int = 1000, max_categories: int = 1000) -> dict:
    """The profile of one column (docs/monitoring.md, "Formats"). ``kind`` None infers it from the type:
    strings, bools and dictionaries are categorical, numbers numeric; either becomes "binary"
    with at most two distinct values. ``kind="categorical"`` forces category counts on a
    numeric column (ids, codes)."""
    if kind not in (None, *KINDS):
        raise InvalidInput(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind in ("categorical", "binary"):
        return _categorical_profile(values, max_categories=max_categories)
    if kind is None:
        if isinstance(values, np.ndarray) and values.dtype.kind in "fiu":
            pass
        else:
            arr = _as_array(values)
            if _is_categorical_type(arr.type):
                return _categorical_profile(arr, max_categories=max_categories)
            values = arr
    x, missing = numeric_values(values)
    return _numeric_profile(x, missing, quantiles=quantiles, exact_rows=exact_rows,
                            max_categories=max_categories)


def build_profile(table: pa.Table, *, categorical: Iterable[str] = (), quantiles: int = 1000,
                  exact_rows: int = 1000, max_categories: int = 1000,
                  source: dict | None = None, threads: int | None = None) -> dict:
    """The reference profile of a training table (every column is a feature, in order).

    Columns are profiled in a thread pool: numpy's sort and pyarrow's kernels release the GIL,
    so a 300k x 1000 table uses every core."""
    cat = set(categorical)
    unknown = cat - set(table.column_names)
    if unknown:
        raise InvalidInput(f"categorical columns {sorted(unknown)} are not in the table "
                           f"(columns: {table.column_names[:20]}{'...' if table.num_columns > 20 else ''})")
    if quantiles < 2:
        raise InvalidInput(f"quantiles={quantiles}: need at least 2")

    def one(name: str) -> dict:
        col = table.column(name)
        return column_profile(col, kind="categorical" if name in cat else None, quantiles=quantiles,
                              exact_rows=exact_rows, max_categories=max_categories)

    names = table.column_names
    with ThreadPoolExecutor(max_workers=threads) as ex:
        profiles = list(ex.map(one, names))
    return {"format": FORMAT, "rows": int(table.num_rows), "source": dict(source or {}),
            "features": dict(zip(names, profiles)), "prediction": None, "holdout": None}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.bool_, bool)):
        return bool(v)
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating, float)):
        return _finite_float(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return [_jsonable(x) for x in v]
    return v


def add_predictions(profile: dict, *, task: str, classes: list | None, predictions, labels,
                    probabilities=None, holdout_rows: int = 5000) -> dict:
    """Add the model's behaviour on the holdout: ``prediction`` (the profile of predicted labels
    -- categorical for classification, numeric for regression -- which prediction drift compares
    with) and ``holdout`` (the first ``holdout_rows`` labels, predictions and class
    probabilities, which CBPE calibrates against). Returns the same dict."""
    if task not in ("classification", "regression"):
        raise InvalidInput(f"task {task!r} is not 'classification' or 'regression'")
    preds = np.asarray(predictions)
    labs = np.asarray(labels)
    if len(preds) != len(labs):
        raise InvalidInput(f"{len(preds)} predictions but {len(labs)} labels; they must be row-aligned")
    probs = None if probabilities is None else np.asarray(probabilities, dtype=np.float64)
    if probs is not None:
        if probs.ndim != 2 or probs.shape[0] != len(preds):
            raise InvalidInput(f"probabilities of shape {probs.shape}: expected ({len(preds)}, n_classes)")
        if classes is not None and probs.shape[1] != len(classes):
            raise InvalidInput(f"probabilities have {probs.shape[1]} columns but {len(classes)} classes")
    if task == "classification":
        profile["prediction"] = _categorical_profile(pa.array(preds.tolist()), max_categories=10**6)
    else:
        profile["prediction"] = column_profile(preds.astype(np.float64), kind="numeric")
    k = min(holdout_rows, len(preds))
    profile["holdout"] = {
        "task": task,
        "classes": None if classes is None else _jsonable(list(classes)),
        "labels": _jsonable(labs[:k].tolist()),
        "predictions": _jsonable(preds[:k].tolist()),
        "probabilities": None if probs is None else _jsonable(probs[:k].tolist()),
    }
    return profile
