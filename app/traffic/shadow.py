"""The comparison of an endpoint's shadows with its primary answers
(``GET /v1/endpoints/{name}/shadow/report``): what nobody else computes from mirrored traffic
(kserve#2978, argo-rollouts#563).

A shadow answers a sampled copy of a request; its answer is logged under
``shadow_log(endpoint)`` with the primary's ``request_id`` and ``instance`` and the shadow's
label as ``variant``. The report pairs each shadow row with the primary row of the same
prediction, so both sides are measured on exactly the same inputs: how often they agree
(classification) or how far apart they are (regression), their latency and error rates side by
side, and, for the pairs whose feedback has arrived, the quality metric of each against the
same labels. Pure: tables in, a JSON-safe dict out.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from app.experiments.metrics import as_number, parse_json, same_label

__all__ = ["shadow_report", "infer_task"]

Task = Literal["classification", "regression"]
_ERROR_STATUS = 500


def infer_task(predictions: list[Any]) -> Task:
    """regression when every prediction is a number and one at least is not whole; otherwise
    classification (labels, booleans, class ids)."""
    numbers = [as_number(p) for p in predictions if p is not None]
    if numbers and all(n is not None for n in numbers) and any(n != int(n) for n in numbers):  # type: ignore[arg-type]
        return "regression"
    return "classification"


def _float(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


def _latency(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "mean": None}
    arr = np.asarray(values, dtype=float)
    return {
        "p50": _float(np.percentile(arr, 50)),
        "p95": _float(np.percentile(arr, 95)),
        "mean": _float(arr.mean()),
    }


def _rate(hits: int, n: int) -> float | None:
    return hits / n if n else None


def _column(table: pa.Table, name: str, default: Any = None) -> list[Any]:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


_FIELDS = ("request_id", "instance", "prediction", "latency_ms", "status", "variant")


def _row(prediction: str | None, latency: float | None, status: int | None) -> dict[str, Any]:
    code = 200 if status is None else int(status)
    return {
        "prediction": parse_json(prediction), "latency_ms": latency, "error": code >= _ERROR_STATUS,
        "answered": code < 400 and prediction is not None,
    }


def _rows_by_variant(table: pa.Table, *, by_variant: bool) -> dict[str, dict[tuple[str, int], dict[str, Any]]]:
    """variant -> (request_id, instance) -> the fields the report reads (one group, ``""``,
    unless ``by_variant``); a key logged twice keeps its first row, as ``read_window`` does."""
    out: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for rid, inst, pred, latency, status, variant in zip(*(_column(table, c) for c in _FIELDS)):
        if rid is None:
            continue
        group = out.setdefault((variant or "") if by_variant else "", {})
        key = (rid, int(inst or 0))
        if key not in group:
            group[key] = _row(pred, latency, status)
    return out


def _feedback(table: pa.Table | None) -> dict[tuple[str, int], tuple[Any, float | None]]:
    """(request_id, instance) -> (label, value) of the current feedback; the last row of a key
    wins (``FeedbackStore.latest`` gives one)."""
    if table is None or table.num_rows == 0:
        return {}
    out: dict[tuple[str, int], tuple[Any, float | None]] = {}
    for rid, inst, label, value in zip(
        _column(table, "request_id"), _column(table, "instance", 0), _column(table, "label"), _column(table, "value")
    ):
        if rid is not None:
            out[(rid, int(inst or 0))] = (parse_json(label), value)
    return out


def _quality(task: Task, pairs: list[tuple[tuple[str, int], tuple[dict, dict]]], labels: dict) -> dict[str, Any]:
    """The quality metric of primary and shadow on the same labelled pairs (both answered)."""
    if task == "classification":
        hits_p = hits_s = n = 0
        for key, (p, s) in pairs:
            label = labels.get(key, (None, None))[0]
            if label is None or not (p["answered"] and s["answered"]):
                continue
            n += 1
            hits_p += same_label(p["prediction"], label)
            hits_s += same_label(s["prediction"], label)
        return {"metric": "accuracy", "n_labelled": n,
                "primary": {"accuracy": _rate(hits_p, n)}, "shadow": {"accuracy": _rate(hits_s, n)}}
    err_p: list[float] = []
    err_s: list[float] = []
    for key, (p, s) in pairs:
        value = labels.get(key, (None, None))[1]
        yp, ys = as_number(p["prediction"]), as_number(s["prediction"])
        if value is None or yp is None or ys is None or not (p["answered"] and s["answered"]):
            continue
        err_p.append(yp - value)
        err_s.append(ys - value)

    def metrics(errors: list[float]) -> dict[str, float | None]:
        if not errors:
            return {"rmse": None, "mae": None}
        arr = np.asarray(errors, dtype=float)
        return {"rmse": _float(math.sqrt(float(np.mean(arr**2)))), "mae": _float(float(np.mean(np.abs(arr))))}

    return {"metric": "rmse", "n_labelled": len(err_p), "primary": metrics(err_p), "shadow": metrics(err_s)}


def shadow_report(
    primary: pa.Table, shadow: pa.Table, *, task: str | None, feedback: pa.Table | None = None
) -> dict[str, Any]:
    """Compare each shadow (``shadow``'s ``variant`` column: the shadow's label) with the
    primary answers of the same predictions (joined on ``request_id`` and ``instance``).

    Per shadow: ``n_shadow`` rows logged, ``n_compared`` pairs with a primary row, and over the
    pairs: ``agreement`` (share of pairs both answered with the same prediction),
    ``mean_abs_diff`` / ``max_abs_diff`` of numeric predictions, ``latency_ms`` (p50, p95,
    mean) and ``error_rate`` (status >= 500; a null status is a 200 of an older file) of
    primary and shadow, and ``quality``: accuracy (classification, against ``label``) or
    rmse / mae (regression, against ``value``) of both on the pairs with feedback. ``task``
    None: inferred from the primary's predictions (:func:`infer_task`). None where there is no
    data; every number is finite, so the dict is JSON as it is."""
    if task not in (None, "classification", "regression"):
        raise ValueError(f"task {task!r}: use 'classification', 'regression' or None")
    prim = _rows_by_variant(primary, by_variant=False).get("", {})
    chosen: Task = task or infer_task([r["prediction"] for r in prim.values() if r["answered"]])  # type: ignore[assignment]
    labels = _feedback(feedback)
    by_shadow = _rows_by_variant(shadow, by_variant=True)

    report: dict[str, Any] = {"task": chosen, "primary": {"n": len(prim)}, "shadows": {}}
    for label in sorted(by_shadow):
        rows = by_shadow[label]
        pairs = [(key, (prim[key], s)) for key, s in rows.items() if key in prim]
        both = [(p, s) for _, (p, s) in pairs if p["answered"] and s["answered"]]
        agree = sum(same_label(p["prediction"], s["prediction"]) for p, s in both)
        diffs = [
            abs(x - y)
            for x, y in ((as_number(p["prediction"]), as_number(s["prediction"])) for p, s in both)
            if x is not None and y is not None
        ]
        n = len(pairs)
        report["shadows"][label] = {
            "n_shadow": len(rows),
            "n_compared": n,
            "n_both_answered": len(both),
            "agreement": _rate(agree, len(both)),
            "mean_abs_diff": _float(float(np.mean(diffs))) if diffs else None,
            "max_abs_diff": _float(max(diffs)) if diffs else None,
            "latency_ms": {
                "primary": _latency([p["latency_ms"] for _, (p, _s) in pairs if p["latency_ms"] is not None]),
                "shadow": _latency([s["latency_ms"] for _, (_p, s) in pairs if s["latency_ms"] is not None]),
            },
            "error_rate": {
                "primary": _rate(sum(p["error"] for _, (p, _s) in pairs), n),
                "shadow": _rate(sum(s["error"] for _, (_p, s) in pairs), n),
            },
            "quality": _quality(chosen, pairs, labels),
        }
    return report
