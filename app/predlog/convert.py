"""Prediction records -> rows of the log (``layout.SCHEMA``): one row per instance, the inputs
as a JSON object {feature: value}, the prediction as JSON, the probabilities as a list.

Runs in the PredictionLog actor, off the request path. The serving path hands over the payload
as the model took it (``app.serving.payload``): ``{"instances": [[...], ...]}`` (rows may also
be objects keyed by feature name), ``{"inputs": {col: [...]}}`` or ``{"tensor": matrix}``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import numpy as np
import pyarrow as pa

from app.predlog.layout import SCHEMA
from app.predlog.records import PredictionRecord

log = logging.getLogger(__name__)


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (bytes, bytearray)):
        return value.decode("utf-8", "replace")
    if hasattr(value, "isoformat"):  # a stored feature's timestamp
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


_dumps = json.JSONEncoder(default=_json_default, separators=(",", ":")).encode


def _names(feature_names: list[str] | None, width: int) -> list[str]:
    if feature_names and len(feature_names) == width:
        return list(feature_names)
    return [f"f{i}" for i in range(width)]


def input_rows(inputs: dict[str, Any], feature_names: list[str] | None) -> list[str]:
    """One JSON object {feature: value} per instance of a prediction payload."""
    tensor = inputs.get("tensor")
    if tensor is not None:
        matrix = np.asarray(tensor)
        if matrix.ndim == 1:
            matrix = matrix.reshape(1, -1)
        rows = matrix.reshape(matrix.shape[0], -1).tolist()
        names = _names(feature_names, len(rows[0]) if rows else 0)
        return [_dumps(dict(zip(names, row))) for row in rows]
    instances = inputs.get("instances")
    if instances is not None:
        out = []
        names: list[str] | None = None
        for row in instances:
            if isinstance(row, dict):
                out.append(_dumps(row))
                continue
            if not isinstance(row, (list, tuple, np.ndarray)):
                row = [row]
            if names is None or len(names) != len(row):
                names = _names(feature_names, len(row))
            out.append(_dumps(dict(zip(names, row))))
        return out
    columns = inputs.get("inputs")
    if isinstance(columns, dict) and columns:
        names = list(columns)
        values = [list(columns[n]) if isinstance(columns[n], (list, tuple, np.ndarray)) else [columns[n]] for n in names]
        return [_dumps(dict(zip(names, row))) for row in zip(*values)]
    raise ValueError(f"a payload with none of instances / inputs / tensor (keys {sorted(inputs)[:5]})")


def _probability_row(row: Any) -> list[float] | None:
    if row is None:
        return None
    if isinstance(row, dict):
        row = list(row.values())
    return [float(v) for v in np.asarray(row, dtype=np.float64).ravel()]


class _Columns:
    def __init__(self) -> None:
        self.cols: dict[str, list] = {f.name: [] for f in SCHEMA}

    def add(self, rec: PredictionRecord, inputs: list[str | None], predictions: list[str | None],
            probabilities: list[list[float] | None]) -> None:
        n = len(inputs)
        c = self.cols
        c["request_id"].extend([rec.request_id] * n)
        c["instance"].extend(range(n))
        c["client_request_id"].extend([rec.client_request_id] * n)
        c["timestamp"].extend([int(rec.timestamp * 1_000_000)] * n)
        c["endpoint"].extend([rec.endpoint] * n)
        c["variant"].extend([rec.variant or ""] * n)
        c["model"].extend([rec.model] * n)
        c["model_version"].extend([str(rec.model_version)] * n)
        c["protocol"].extend([rec.protocol] * n)
        c["inputs"].extend(inputs)
        c["prediction"].extend(predictions)
        c["probabilities"].extend(probabilities)
        c["latency_ms"].extend([float(rec.latency_ms)] * n)
        c["caller"].extend([rec.caller] * n)
        c["status"].extend([int(rec.status)] * n)
        used = rec.features
        c["features"].extend([None] * n if used is None else
                             [_dumps(used[i]) if i < len(used) else None for i in range(n)])

    def table(self) -> pa.Table:
        arrays = [pa.array(self.cols[f.name], type=f.type) for f in SCHEMA]
        return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _rows(rec: PredictionRecord) -> tuple[list[str | None], list[str | None], list[list[float] | None]]:
    inputs = input_rows(rec.inputs, rec.feature_names) if rec.inputs is not None else None
    outputs = rec.outputs
    preds = probs = None
    if outputs is not None:
        raw = outputs.get("predictions")
        if raw is not None:
            preds = [_dumps(p) for p in (raw.tolist() if isinstance(raw, np.ndarray) else raw)]
        raw = outputs.get("probabilities")
        if raw is not None:
            probs = [_probability_row(p) for p in (raw.tolist() if isinstance(raw, np.ndarray) else raw)]
    n = len(inputs) if inputs is not None else len(preds) if preds is not None else len(probs) if probs else 1
    n = max(n, 1)

    def fit(values: list | None) -> list:
        if values is None:
            return [None] * n
        return (values + [None] * n)[:n]

    return fit(inputs), fit(preds), fit(probs)


def to_table(records: list[PredictionRecord]) -> pa.Table:
    """The rows of ``records`` as a table of ``layout.SCHEMA`` (one row per instance).

    A record whose payload cannot be read (it should not happen: the model took it) keeps its
    metadata with null inputs and outputs rather than losing the request from the log."""
    cols = _Columns()
    for rec in records:
        try:
            rows = _rows(rec)
        except Exception as exc:
            log.warning("prediction log: request %s of %s: payload not readable (%s); kept without inputs/outputs",
                        rec.request_id, rec.endpoint, exc)
            rows = ([None], [None], [None])
        cols.add(rec, *rows)
    return cols.table()
