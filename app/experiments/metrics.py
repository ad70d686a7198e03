"""Per-prediction metric values of each traffic variant, from the prediction log joined with its
feedback (``app.predlog.join.labeled(..., how="left")``).

Every metric is one number per logged prediction (one row of a request), so each test downstream
compares two samples of numbers: 0/1 for the binary metrics, reals for the continuous ones. A
row enters a metric only when the metric is defined for it: conversion, value, accuracy and rmse
need feedback (an unlabeled prediction is not a failure, it is unknown); latency and error_rate
count every logged request. Pure functions over pyarrow and numpy.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.errors import InvalidInput
from app.experiments.spec import METRICS, metric_kind

__all__ = ["MetricSamples", "metric_samples", "assignment_counts", "feedback_column", "parse_json", "as_number", "same_label"]

_FEEDBACK_PREFIX = "feedback_"  # app.predlog.join.PREFIX
_OK_STATUS = 200  # a null status: a file written before the column existed held successes only


@dataclass(frozen=True)
class MetricSamples:
    """A metric's per-row values of each variant, in log order, with the rows' times
    (microseconds since the epoch, UTC) for the timeline."""

    metric: str
    kind: str  # binary | continuous
    values: dict[str, np.ndarray]
    times: dict[str, np.ndarray]

    def n(self, variant: str) -> int:
        return int(self.values.get(variant, np.empty(0)).size)


def feedback_column(table: pa.Table, name: str) -> pa.ChunkedArray | None:
    """The feedback column ``name`` (label, value, reward) of a joined table: ``feedback_<name>``
    as ``join_feedback`` names it, or ``<name>`` for a table built with plain names."""
    for column in (_FEEDBACK_PREFIX + name, name):
        if column in table.column_names:
            return table.column(column)
    return None


def _floats(column: pa.ChunkedArray | None, n: int) -> np.ndarray:
    if column is None:
        return np.full(n, np.nan)
    return np.asarray(column.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=float)


def _strings(column: pa.ChunkedArray | None, n: int) -> list[Any]:
    return [None] * n if column is None else column.to_pylist()


def _times(table: pa.Table) -> np.ndarray:
    if "timestamp" not in table.column_names:
        return np.zeros(table.num_rows, dtype=np.int64)
    ts = table.column("timestamp").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return np.asarray(ts.to_numpy(zero_copy_only=False), dtype=np.int64)


def parse_json(text: Any) -> Any:
    """A logged JSON text (prediction, label) as its value; text that is not JSON as itself."""
    if text is None:
        return None
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return text


def as_number(value: Any) -> float | None:
    """A JSON number (not a boolean) as a finite float; a one-element list counts as its element
    (a regressor's single output)."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def same_label(prediction: Any, label: Any) -> bool:
    """Whether a prediction (parsed JSON) equals a label (parsed JSON): numbers compare as
    numbers (1 == 1.0, so an integer class logged as 1.0 matches), booleans only with booleans,
    strings only with strings."""
    if isinstance(prediction, list) and len(prediction) == 1:
        prediction = prediction[0]
    a, b = as_number(prediction), as_number(label)
    if a is not None and b is not None:
        return a == b
    return type(prediction) is type(label) and prediction == label


def _row_values(table: pa.Table, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(values, defined): one value per row, and which rows the metric is defined for."""
    n = table.num_rows
    if metric == "latency":
        values = _floats(table.column("latency_ms") if "latency_ms" in table.column_names else None, n)
        return values, np.isfinite(values)
    if metric == "error_rate":
        status = _floats(table.column("status") if "status" in table.column_names else None, n)
        status = np.where(np.isnan(status), _OK_STATUS, status)
        return (status >= 500).astype(float), np.ones(n, dtype=bool)
    reward = _floats(feedback_column(table, "reward"), n)
    value = _floats(feedback_column(table, "value"), n)
    if metric == "conversion":
        outcome = np.where(np.isnan(reward), value, reward)
        defined = ~np.isnan(outcome)
        return np.where(defined, outcome > 0, False).astype(float), defined
    if metric == "value":
        outcome = np.where(np.isnan(value), reward, value)
        return outcome, np.isfinite(outcome)
    predictions = [parse_json(p) for p in _strings(table.column("prediction") if "prediction" in table.column_names
                                               else None, n)]
    labels = [parse_json(x) for x in _strings(feedback_column(table, "label"), n)]
    out = np.zeros(n)
    defined = np.zeros(n, dtype=bool)
    if metric == "accuracy":
        for i, (p, y) in enumerate(zip(predictions, labels)):
            if p is not None and y is not None:
                defined[i] = True
                out[i] = 1.0 if same_label(p, y) else 0.0
        return out, defined
    # rmse: the squared error of each prediction; its mean is the MSE, whose root the report shows
    for i, p in enumerate(predictions):
        predicted = as_number(p)
        truth = value[i] if np.isfinite(value[i]) else as_number(labels[i])
        if predicted is not None and truth is not None:
            defined[i] = True
            out[i] = (predicted - truth) ** 2
    return out, defined


def metric_samples(table: pa.Table, metric: str, variants: list[str] | None = None) -> MetricSamples:
    """The values of ``metric`` per variant of ``table`` (a joined log window). ``variants``
    limits and orders the result (every variant gets an entry, maybe empty); unset = the
    variants the table holds. Rows of other variants are left out."""
    if metric not in METRICS:
        raise InvalidInput(f"metric {metric!r} is not one of {', '.join(METRICS)}")
    column = table.column("variant") if "variant" in table.column_names else pa.chunked_array(
        [pa.nulls(table.num_rows, pa.string())])
    names = variants if variants is not None else sorted(v for v in pc.unique(column).to_pylist() if v is not None)
    values, defined = _row_values(table, metric)
    times = _times(table)
    out_values: dict[str, np.ndarray] = {}
    out_times: dict[str, np.ndarray] = {}
    for name in names:
        same = pc.fill_null(pc.equal(column, pa.scalar(name, pa.string())), False)
        mask = np.asarray(same.to_numpy(zero_copy_only=False), dtype=bool) & defined
        out_values[name] = values[mask]
        out_times[name] = times[mask]
    return MetricSamples(metric=metric, kind=metric_kind(metric), values=out_values, times=out_times)


def assignment_counts(table: pa.Table) -> dict[str, int]:
    """Requests (distinct request ids) per variant: what the split assigned, whatever each
    request's outcome, for the sample ratio mismatch check."""
    if table.num_rows == 0:
        return {}
    pairs = table.select(["variant", "request_id"]).group_by(["variant", "request_id"]).aggregate([])
    counts = pairs.group_by("variant").aggregate([("request_id", "count")])
    return {v: int(c) for v, c in zip(counts.column("variant").to_pylist(),
                                     counts.column("request_id_count").to_pylist())}

