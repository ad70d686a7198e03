"""Model performance in a monitoring window: measured from the feedback join, with confidence
intervals, and estimated before labels arrive (confidence-based performance estimation, CBPE).

Measured metrics read a joined window (``app.predlog.join.join_feedback``, left join: the feedback
columns are null where no label arrived yet). Accuracy gets the Wilson score interval (Wilson 1927;
Newcombe 1998, method 3) from ``scipy.stats.binomtest``; every other metric a seeded percentile
bootstrap (Efron & Tibshirani 1993, ch. 13). The bootstrap replicates are cheap, so that 500
replicates over 100k rows take about a second: F1 depends on the confusion matrix only, whose
row-bootstrap distribution is a multinomial draw over its cells (all replicates in one call); ROC
AUC ranks the scores once and counts a resample's positives and negatives per distinct score;
log loss and the regression metrics are means over a resample's rows. Metric values agree with
``sklearn.metrics`` (unit tests).

Labels and predictions are logged as JSON text (``prediction``, ``feedback_label``): they compare
as ``app.experiments.metrics.same_label`` does (numbers as numbers, so 1 == 1.0; booleans only with
booleans; strings only with strings), through one canonical key per value.
"""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone
from typing import Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from app.errors import InvalidInput
from app.experiments.metrics import as_number, parse_json

__all__ = ["measured_metrics", "estimate_cbpe", "performance_report", "class_key", "wilson_interval"]

_TASKS = ("classification", "regression")
_FAILED_STATUS = 400
_MIN_CALIBRATION_ROWS = 10
_MAX_SEGMENT_VALUES = 50
_EPS = 1e-15


# -- labels ---------------------------------------------------------------------------------------
def class_key(value: Any) -> str | None:
    """One canonical string per label value (parsed JSON), so that values compare as
    ``same_label`` does: numbers as numbers (``1``, ``1.0`` -> ``"n:1"``), booleans only with
    booleans, strings only with strings; a one-element list counts as its element."""
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if value is None:
        return None
    if isinstance(value, bool):
        return "b:" + ("true" if value else "false")
    number = as_number(value)
    if number is not None:
        return "n:" + (str(int(number)) if number.is_integer() else repr(number))
    if isinstance(value, str):
        return "s:" + value
    return "j:" + json.dumps(value, sort_keys=True)


def _keys_of_json(column: pa.ChunkedArray | None, n: int) -> np.ndarray:
    """The canonical keys of a column of JSON texts (object array, None where null): each
    distinct text is parsed once."""
    if column is None:
        return np.full(n, None, dtype=object)
    encoded = pc.dictionary_encode(column.cast(pa.string()).combine_chunks())
    lookup = np.array([class_key(parse_json(t)) for t in encoded.dictionary.to_pylist()] + [None], dtype=object)
    idx = encoded.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)
    return lookup[idx]


def _numbers_of_json(column: pa.ChunkedArray | None, n: int) -> np.ndarray:
    if column is None:
        return np.full(n, np.nan)
    encoded = pc.dictionary_encode(column.cast(pa.string()).combine_chunks())
    lookup = np.array([_nan_if_none(as_number(parse_json(t))) for t in encoded.dictionary.to_pylist()] + [np.nan])
    return lookup[encoded.indices.fill_null(len(lookup) - 1).to_numpy(zero_copy_only=False)]


def _nan_if_none(value: float | None) -> float:
    return np.nan if value is None else value


def _indices(keys: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class indices of keys; -1 for a key outside ``classes`` (or None)."""
    position = {c: i for i, c in enumerate(classes)}
    return np.fromiter((position.get(k, -1) for k in keys), dtype=np.int64, count=len(keys))


# -- intervals ------------------------------------------------------------------------------------
def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (Wilson 1927; Newcombe 1998, method 3, whose
    example gives 81/263 -> 0.2553..0.3662), from ``scipy.stats.binomtest``. It keeps its
    coverage near the nominal level for small n and proportions near 0 or 1, where the normal
    (Wald) interval does not."""
    from scipy.stats import binomtest

    ci = binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def _percentile_ci(replicates: np.ndarray, confidence: float) -> list[float | None]:
    finite = replicates[np.isfinite(replicates)]
    if finite.size == 0:
        return [None, None]
    alpha = (1 - confidence) / 2
    lo, hi = np.percentile(finite, [100 * alpha, 100 * (1 - alpha)])
    return [float(lo), float(hi)]


def _resamples(n: int, bootstrap: int, rng: np.random.Generator):
    """The row indices of each bootstrap resample (n draws with replacement)."""
    for _ in range(bootstrap):
        yield rng.integers(0, n, size=n)


def _entry(value: float | None, ci: list[float | None], n: int) -> dict[str, Any]:
    def clean(v):
        return None if v is None or not math.isfinite(v) else float(v)

    return {"value": clean(value), "ci": [clean(ci[0]), clean(ci[1])], "n": int(n)}


# -- metric kernels ------------------------------------------------------------------------------
class _Auc:
    """ROC AUC of one sample and of its bootstrap resamples: P(score of a positive > score of a
    negative) + 1/2 P(tie), the Mann-Whitney form (Hanley & McNeil 1982) that
    ``sklearn.metrics.roc_auc_score`` equals. The scores are ranked once (``np.unique``); a
    resample only counts positives and negatives per distinct score (``np.bincount``).

    Binary: the AUC of the second class's probability; multiclass: the macro mean of the
    one-vs-rest AUCs (``roc_auc_score(multi_class="ovr", average="macro")``), over the classes
    with positives and negatives in the sample."""

    def __init__(self, true: np.ndarray, probabilities: np.ndarray):
        k = probabilities.shape[1]
        scored = [1] if k == 2 else range(k)
        self.parts = []
        for c in scored:
            distinct, group = np.unique(probabilities[:, c], return_inverse=True)
            self.parts.append((group.reshape(-1), distinct.size, (true == c).astype(float)))

    def __call__(self, idx: np.ndarray | None = None) -> float:
        values = []
        for group, size, positive in self.parts:
            g, pos = (group, positive) if idx is None else (group[idx], positive[idx])
            gp = np.bincount(g, weights=pos, minlength=size)
            gn = np.bincount(g, minlength=size) - gp
            total = gp.sum() * gn.sum()
            if total > 0:
                values.append(float((gp * (np.cumsum(gn) - 0.5 * gn)).sum() / total))
        return float(np.mean(values)) if values else math.nan


def _f1_from_counts(counts: np.ndarray, k: int, binary: bool) -> np.ndarray:
    """F1 from confusion counts (..., k+1, k+1), index k = a label outside the classes: binary,
    the F1 of class 1; else the macro mean over the k classes (a class never predicted nor
    true scores 0, as sklearn's zero_division default)."""
    tp = np.diagonal(counts[..., :k, :k], axis1=-2, axis2=-1)
    fp = counts[..., :, :k].sum(axis=-2) - tp
    fn = counts[..., :k, :].sum(axis=-1) - tp
    denom = 2 * tp + fp + fn
    f1 = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    return f1[..., 1] if binary else f1.mean(axis=-1)


# -- measured metrics -----------------------------------------------------------------------------
def _check_levels(confidence: float, bootstrap: int) -> None:
    if not 0 < confidence < 1:
        raise InvalidInput(f"confidence={confidence}: use a level between 0 and 1, such as 0.95")
    if not isinstance(bootstrap, int) or isinstance(bootstrap, bool) or bootstrap < 0:
        raise InvalidInput(f"bootstrap={bootstrap!r}: use a number of resamples such as 500 (0: no intervals but "
                           "accuracy's)")


def measured_metrics(
    y_true: Sequence[Any] | np.ndarray,
    y_pred: Sequence[Any] | np.ndarray,
    *,
    task: str,
    classes: Sequence[Any] | None = None,
    probabilities: np.ndarray | None = None,
    confidence: float = 0.95,
    bootstrap: int = 500,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Performance of predictions against their labels, each metric as ``{"value", "ci": [lo,
    hi], "n"}``.

    Classification (labels of any hashable type; ``classes`` their order, default the sorted
    values seen): accuracy with the Wilson interval; F1 (binary: of ``classes[1]``; else macro),
    ROC AUC (binary: of ``classes[1]``'s probability; else one-vs-rest macro) and log loss with
    bootstrap intervals. ``probabilities`` (n, len(classes)) in the order of ``classes``; rows
    with a NaN are left out of AUC and log loss (their ``n`` says how many were scored), so is a
    label outside ``classes``. Regression: RMSE, MAE and R2 with bootstrap intervals; rows with
    a missing (NaN) label or prediction are left out."""
    if task not in _TASKS:
        raise InvalidInput(f"task {task!r}: use 'classification' or 'regression'")
    _check_levels(confidence, bootstrap)
    rng = np.random.default_rng(seed)
    if task == "regression":
        return _regression_metrics(np.asarray(y_true, dtype=float), np.asarray(y_pred, dtype=float), confidence,
                                   bootstrap, rng)
    y_true, y_pred = list(y_true), list(y_pred)
    if len(y_true) != len(y_pred):
        raise InvalidInput(f"{len(y_true)} labels for {len(y_pred)} predictions: give one label per prediction")
    if classes is None:
        classes = sorted({*y_true, *y_pred} - {None}, key=lambda v: (str(type(v)), v))
    classes = list(classes)
    position = {c: i for i, c in enumerate(classes)}
    true = np.fromiter((position.get(v, -1) for v in y_true), dtype=np.int64, count=len(y_true))
    pred = np.fromiter((position.get(v, -1) for v in y_pred), dtype=np.int64, count=len(y_pred))
    correct = np.fromiter((a == b for a, b in zip(y_true, y_pred)), dtype=bool, count=len(y_true))
    probs = None if probabilities is None else np.asarray(probabilities, dtype=float)
    if probs is not None and probs.shape != (len(y_true), len(classes)):
        raise InvalidInput(f"probabilities of shape {probs.shape}: need one row per label and one column per class "
                           f"({len(y_true)} x {len(classes)})")
    return _classification_metrics(true, pred, correct, probs, len(classes), confidence, bootstrap, rng)


def _classification_metrics(true, pred, correct, probs, k, confidence, bootstrap, rng) -> dict[str, dict[str, Any]]:
    n = int(true.size)
    out: dict[str, dict[str, Any]] = {}
    if n == 0 or k == 0:
        return out
    hits = int(correct.sum())
    out["accuracy"] = _entry(hits / n, list(wilson_interval(hits, n, confidence)), n)
    binary = k == 2
    t, p = np.where(true < 0, k, true), np.where(pred < 0, k, pred)
    counts = np.bincount(t * (k + 1) + p, minlength=(k + 1) ** 2).astype(float)
    f1 = float(_f1_from_counts(counts.reshape(k + 1, k + 1), k, binary))
    draws = rng.multinomial(n, counts / counts.sum(), size=bootstrap).reshape(bootstrap, k + 1, k + 1)
    out["f1"] = _entry(f1, _percentile_ci(_f1_from_counts(draws, k, binary), confidence), n)
    if probs is None:
        return out
    scored = (true >= 0) & np.isfinite(probs).all(axis=1)
    m = int(scored.sum())
    if m == 0:
        return out
    st, sp = true[scored], np.clip(probs[scored], 0.0, None)
    sums = sp.sum(axis=1, keepdims=True)
    sp = np.where(sums > 0, sp / np.where(sums > 0, sums, 1), 1.0 / k)
    loss = -np.log(np.clip(sp[np.arange(m), st], _EPS, 1.0))
    auc = _Auc(st, probs[scored])  # the scores as logged (sklearn ranks those); log loss reads them normalized
    auc_value = auc()
    auc_reps, loss_reps = np.empty(bootstrap), np.empty(bootstrap)
    for b, idx in enumerate(_resamples(m, bootstrap, rng)):
        auc_reps[b], loss_reps[b] = auc(idx), loss[idx].mean()
    auc_entry = _entry(auc_value, _percentile_ci(auc_reps, confidence), m)
    if not math.isfinite(auc_value):
        auc_entry["error"] = "the labelled rows hold a single class: AUC needs positives and negatives"
    out["roc_auc"] = auc_entry
    out["log_loss"] = _entry(float(loss.mean()), _percentile_ci(loss_reps, confidence), m)
    return out


def _regression_metrics(y, yhat, confidence, bootstrap, rng) -> dict[str, dict[str, Any]]:
    if y.shape != yhat.shape:
        raise InvalidInput(f"{y.size} labels for {yhat.size} predictions: give one label per prediction")
    keep = np.isfinite(y) & np.isfinite(yhat)
    y, yhat = y[keep], yhat[keep]
    n = int(y.size)
    if n == 0:
        return {}
    err = yhat - y
    se, ae = err**2, np.abs(err)

    reps = np.full((bootstrap, 3), np.nan)
    for b, idx in enumerate(_resamples(n, bootstrap, rng)):
        ry, rse = y[idx], se[idx]
        sse, spread = rse.sum(), ((ry - ry.mean()) ** 2).sum()
        reps[b] = math.sqrt(sse / n), ae[idx].mean(), (1 - sse / spread) if spread > 0 else math.nan
    rmse, mae, r2 = reps[:, 0], reps[:, 1], reps[:, 2]
    sst = float(((y - y.mean()) ** 2).sum())
    r2_value = 1 - float(se.sum()) / sst if n >= 2 and sst > 0 else None
    return {
        "rmse": _entry(math.sqrt(float(se.mean())), _percentile_ci(rmse, confidence), n),
        "mae": _entry(float(ae.mean()), _percentile_ci(mae, confidence), n),
        "r2": _entry(r2_value, _percentile_ci(r2, confidence) if r2_value is not None else [None, None], n),
    }


# -- CBPE -----------------------------------------------------------------------------------------
def _isotonic(x: np.ndarray, y: np.ndarray):
    from sklearn.isotonic import IsotonicRegression

    return IsotonicRegression(y_min=0.0, y_max=1.0, out_of_bounds="clip").fit(x, y)


def _calibration_arrays(calibration: dict[str, Any], class_keys: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(true indices, probabilities, predicted indices) of the holdout rows with a known label
    and a full probability row."""
    labels = calibration.get("labels") or []
    probs = calibration.get("probabilities")
    if not probs or len(probs) != len(labels):
        raise InvalidInput("the calibration holdout has no probabilities for its labels: CBPE needs the model's "
                           "probabilities on labelled reference rows (profile the version with a classifier that has "
                           "predict_proba)")
    k = len(class_keys)
    own = calibration.get("classes")
    columns = list(range(k))
    if own:
        own_keys = [class_key(c) for c in own]
        missing = [c for c, key in zip(range(k), class_keys) if key not in own_keys]
        if missing or len(own_keys) != k:
            raise InvalidInput(f"the calibration holdout's classes {list(own)!r} are not the model's classes: profile the "
                               "version again")
        columns = [own_keys.index(key) for key in class_keys]  # the holdout's columns in the order of class_keys
    p = np.array([row if row is not None and len(row) == k else [np.nan] * k for row in probs], dtype=float)
    p = p[:, columns] if p.size else p.reshape(0, k)
    true = _indices(np.array([class_key(v) for v in labels], dtype=object), class_keys)
    predictions = calibration.get("predictions")
    if predictions and len(predictions) == len(labels):
        pred = _indices(np.array([class_key(v) for v in predictions], dtype=object), class_keys)
    else:
        pred = np.full(len(labels), -1)
    pred = np.where(pred < 0, np.nanargmax(np.where(np.isfinite(p), p, -np.inf), axis=1), pred)
    keep = (true >= 0) & np.isfinite(p).all(axis=1)
    return true[keep], p[keep], pred[keep]


class _Calibrator:
    """The fitted calibration of one reference holdout: per class one-vs-rest isotonic maps
    (the calibrated class probabilities, for the expected confusion matrix) and the map of
    "was the prediction right" on the predicted class's probability (expected accuracy)."""

    def __init__(self, calibration: dict[str, Any], class_keys: list[str]):
        true, p, pred = _calibration_arrays(calibration, class_keys)
        if true.size < _MIN_CALIBRATION_ROWS:
            raise InvalidInput(f"the calibration holdout has {true.size} usable rows; CBPE needs at least "
                               f"{_MIN_CALIBRATION_ROWS} labelled rows with probabilities")
        self.k = len(class_keys)
        rows = np.arange(true.size)
        self.correct = _isotonic(p[rows, pred], (pred == true).astype(float))
        if self.k == 2:
            self.per_class = [_isotonic(p[:, 1], (true == 1).astype(float))]
        else:
            self.per_class = [_isotonic(p[:, c], (true == c).astype(float)) for c in range(self.k)]

    def class_probabilities(self, p: np.ndarray) -> np.ndarray:
        if self.k == 2:
            p1 = self.per_class[0].predict(p[:, 1])
            return np.column_stack([1 - p1, p1])
        q = np.column_stack([m.predict(p[:, c]) for c, m in enumerate(self.per_class)])
        sums = q.sum(axis=1, keepdims=True)
        return np.where(sums > 0, q / np.where(sums > 0, sums, 1), 1.0 / self.k)


def estimate_cbpe(
    probabilities: np.ndarray,
    *,
    classes: Sequence[Any],
    calibration: dict[str, Any],
    confidence: float = 0.95,
    predictions: np.ndarray | None = None,
    simulations: int = 200,
    seed: int = 0,
    _calibrator: _Calibrator | None = None,
) -> dict[str, Any]:
    """Expected accuracy (and F1) of a classifier on rows whose labels have not arrived, from
    its own confidence: confidence-based performance estimation as NannyML describes it
    (https://nannyml.readthedocs.io/en/stable/how_it_works/performance_estimation.html, "CBPE").

    The model's scores are calibrated on the reference ``calibration`` holdout (the profile's
    ``"holdout"``: labels, probabilities, predictions) with isotonic regression
    (``sklearn.isotonic.IsotonicRegression``; Zadrozny & Elkan 2002): the predicted class's
    probability against "was the prediction right" for accuracy, and each class's probability
    one-vs-rest (binary: the positive class ``classes[1]``) for the expected confusion matrix, so
    expected F1 = 2 E[TP] / (2 E[TP] + E[FP] + E[FN]) (binary: of ``classes[1]``; multiclass:
    macro). Expected accuracy is the mean calibrated confidence; its interval is the normal
    approximation of the Poisson-binomial law of the realized accuracy (variance
    sum p(1-p) / n^2). F1's interval is the percentile interval of ``simulations`` label draws
    from the calibrated class probabilities. The estimate holds under covariate shift (the
    relation of labels to scores unchanged), not under concept drift.

    ``probabilities``: (n, len(classes)) in the order of ``classes``; ``predictions``: the
    predicted class indices (default: the most probable class)."""
    class_keys = [class_key(c) for c in classes]
    k = len(class_keys)
    if k < 2:
        raise InvalidInput(f"classes {list(classes)!r}: CBPE needs a classifier with at least two classes")
    p = np.asarray(probabilities, dtype=float)
    if p.ndim != 2 or p.shape[1] != k:
        raise InvalidInput(f"probabilities of shape {p.shape}: need one column per class ({k})")
    cal = _calibrator or _Calibrator(calibration, class_keys)
    keep = np.isfinite(p).all(axis=1)
    p = p[keep]
    n = int(p.shape[0])
    if n == 0:
        return {"rows": 0}
    pred = np.argmax(p, axis=1) if predictions is None else np.asarray(predictions, dtype=np.int64)[keep]
    pred = np.where((pred < 0) | (pred >= k), np.argmax(p, axis=1), pred)
    rows = np.arange(n)
    conf = cal.correct.predict(p[rows, pred])
    accuracy = float(conf.mean())
    from scipy.stats import norm

    half = float(norm.ppf(0.5 + confidence / 2) * math.sqrt(float((conf * (1 - conf)).sum())) / n)
    out: dict[str, Any] = {
        "rows": n,
        "accuracy": {"value": accuracy, "ci": [max(0.0, accuracy - half), min(1.0, accuracy + half)]},
    }
    q = cal.class_probabilities(p)
    predicted = np.zeros((n, k), dtype=bool)
    predicted[rows, pred] = True
    tp = (q * predicted).sum(axis=0)
    fp = ((1 - q) * predicted).sum(axis=0)
    fn = (q * ~predicted).sum(axis=0)
    denom = 2 * tp + fp + fn
    f1_class = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    f1 = float(f1_class[1] if k == 2 else f1_class.mean())
    rng = np.random.default_rng(seed)
    sims = []
    cum = np.cumsum(q, axis=1)
    for _ in range(simulations):
        if k == 2:
            drawn = (rng.random(n) < q[:, 1]).astype(np.int64)
        else:
            drawn = np.minimum((rng.random((n, 1)) > cum).sum(axis=1), k - 1)
        counts = np.bincount(drawn * (k + 1) + pred, minlength=(k + 1) ** 2).reshape(k + 1, k + 1)
        sims.append(_f1_from_counts(counts.astype(float), k, k == 2))
    out["f1"] = {"value": f1, "ci": _percentile_ci(np.asarray(sims, dtype=float), confidence)}
    return out


# -- the report over a joined window --------------------------------------------------------------
def _probability_matrix(column: pa.ChunkedArray | None, n: int, k: int) -> np.ndarray | None:
    """(n, k) from a list<double> column; a null row or one of another length is all NaN."""
    if column is None or k == 0:
        return None
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    lengths = pc.fill_null(pc.list_value_length(arr), -1).to_numpy(zero_copy_only=False)
    if not (lengths == k).any():
        return None
    out = np.full((n, k), np.nan)
    good = lengths == k
    fixed = arr.filter(pa.array(good))
    values = np.asarray(pc.list_flatten(fixed).to_numpy(zero_copy_only=False), dtype=float)
    out[good] = values.reshape(-1, k)
    return out


def _times_s(table: pa.Table) -> np.ndarray:
    ts = table.column("timestamp").cast(pa.timestamp("us", tz="UTC")).cast(pa.int64())
    return np.asarray(ts.to_numpy(zero_copy_only=False), dtype=np.int64) / 1e6


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, tz=timezone.utc).isoformat()


class _Window:
    """The usable rows of a joined window as arrays, computed once for every slice."""

    def __init__(self, joined: pa.Table, task: str, classes: list[Any] | None):
        names = joined.column_names
        n = joined.num_rows
        keep = np.ones(n, dtype=bool)
        if "status" in names:
            status = joined.column("status").cast(pa.float64()).to_numpy(zero_copy_only=False)
            keep &= ~(np.nan_to_num(np.asarray(status, dtype=float), nan=200.0) >= _FAILED_STATUS)
        if "prediction" not in names:
            raise InvalidInput("the joined table has no 'prediction' column: log the outputs (predlog) to measure "
                               "performance")
        keep &= np.asarray(joined.column("prediction").is_valid().to_numpy(zero_copy_only=False), dtype=bool)
        self.table = joined.filter(pa.array(keep))
        t, n = self.table, self.table.num_rows
        self.n = n
        self.task = task
        label_col = t.column("feedback_label") if "feedback_label" in t.column_names else None
        value_col = t.column("feedback_value") if "feedback_value" in t.column_names else None
        if task == "regression":
            self.pred = _numbers_of_json(t.column("prediction"), n)
            value = np.full(n, np.nan) if value_col is None else np.asarray(
                value_col.cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=float)
            self.true = np.where(np.isfinite(value), value, _numbers_of_json(label_col, n))
            self.labelled = np.isfinite(self.true)
            self.classes, self.probs = None, None
            return
        self.pred = _keys_of_json(t.column("prediction"), n)
        self.true = _keys_of_json(label_col, n)
        self.labelled = np.fromiter((v is not None for v in self.true), dtype=bool, count=n)
        self.class_values = list(classes) if classes else None
        if classes:
            self.classes = [class_key(c) for c in classes]
            probs_col = t.column("probabilities") if "probabilities" in t.column_names else None
            self.probs = _probability_matrix(probs_col, n, len(self.classes))
        else:
            self.classes = sorted({*self.pred[self.labelled], *self.true[self.labelled]} - {None})
            self.probs = None  # without the profile's classes the probabilities' column order is unknown
        self.true_idx = _indices(self.true, self.classes)
        self.pred_idx = _indices(self.pred, self.classes)

    def measured(self, mask: np.ndarray, confidence: float, bootstrap: int, seed: int) -> dict[str, Any]:
        m = mask & self.labelled
        if self.task == "regression":
            return measured_metrics(self.true[m], self.pred[m], task="regression", confidence=confidence,
                                    bootstrap=bootstrap, seed=seed)
        rng = np.random.default_rng(seed)
        probs = None if self.probs is None else self.probs[m]
        correct = self.true[m] == self.pred[m]
        return _classification_metrics(self.true_idx[m], self.pred_idx[m], correct, probs, len(self.classes),
                                       confidence, bootstrap, rng)


def performance_report(
    joined: pa.Table,
    *,
    task: str,
    classes: Sequence[Any] | None,
    calibration: dict[str, Any] | None,
    segments: Sequence[str] = (),
    bucket_s: float | None = None,
    confidence: float = 0.95,
    min_rows: int = 1,
    bootstrap: int = 500,
    seed: int = 0,
) -> dict[str, Any]:
    """Performance of one monitoring window: ``joined`` is the window's prediction log joined
    with its feedback (left join), plus optional string segment columns.

    Rows of failed requests (status >= 400) and rows without a logged prediction are left out.
    ``overall`` / ``variants`` / ``segments`` / ``buckets`` hold measured metrics
    (:func:`measured_metrics`) of the labelled rows (a slice with fewer than ``min_rows``
    labelled rows gets no metrics); ``estimated`` is CBPE (:func:`estimate_cbpe`) over every row,
    labelled or not (classification with probabilities and a ``calibration`` holdout), and
    ``comparison`` sets it beside the measured value on the labelled rows, so a reader sees how
    well the estimate did where the truth is known. Segments list at most 50 values each, the
    most frequent."""
    if task not in _TASKS:
        raise InvalidInput(f"task {task!r}: use 'classification' or 'regression'")
    _check_levels(confidence, bootstrap)
    if bucket_s is not None and not bucket_s > 0:
        raise InvalidInput(f"bucket_s={bucket_s}: use a positive number of seconds, or none for no time buckets")
    for column in segments:
        if column not in joined.column_names:
            raise InvalidInput(f"segment column {column!r} is not in the joined table (it has {joined.column_names})")
    w = _Window(joined, task, list(classes) if classes else None)
    everything = np.ones(w.n, dtype=bool)
    min_rows = max(1, int(min_rows))

    def measured(mask: np.ndarray) -> dict[str, Any]:
        return w.measured(mask, confidence, bootstrap, seed) if int((mask & w.labelled).sum()) >= min_rows else {}

    calibrator, estimate_error = None, None
    can_estimate = task == "classification" and w.probs is not None and calibration is not None and len(w.classes) >= 2
    if can_estimate:
        try:
            calibrator = _Calibrator(calibration, w.classes)
        except InvalidInput as exc:
            estimate_error = str(exc)

    def estimated(mask: np.ndarray) -> dict[str, Any] | None:
        if calibrator is None or not mask.any():
            return None
        result = estimate_cbpe(w.probs[mask], classes=w.class_values, calibration=calibration, confidence=confidence,
                               predictions=w.pred_idx[mask], seed=seed, _calibrator=calibrator)
        return {name: v for name, v in result.items() if name != "rows"} or None

    labelled_total = int(w.labelled.sum())
    report: dict[str, Any] = {
        "task": task,
        "rows": w.n,
        "labelled_rows": labelled_total,
        "confidence": confidence,
        "overall": measured(everything),
        "variants": {},
        "segments": {},
        "buckets": [],
        "estimated": estimated(everything),
        "comparison": {},
    }
    if estimate_error:
        report["estimated_error"] = estimate_error
    if "variant" in w.table.column_names and w.n:
        variants = np.asarray(w.table.column("variant").cast(pa.string()).fill_null("").to_numpy(zero_copy_only=False),
                              dtype=object)
        names = sorted(set(variants))
        if len(names) > 1 or names[0] != "":
            report["variants"] = {name: {"rows": int((variants == name).sum()),
                                         "labelled_rows": int(((variants == name) & w.labelled).sum()),
                                         "metrics": measured(variants == name)} for name in names}
    for column in segments:
        values = np.asarray(w.table.column(column).cast(pa.string()).fill_null("(missing)")
                            .to_numpy(zero_copy_only=False), dtype=object)
        distinct, counts = np.unique(values, return_counts=True) if w.n else (np.empty(0), np.empty(0))
        top = distinct[np.argsort(-counts, kind="stable")][:_MAX_SEGMENT_VALUES]
        report["segments"][column] = {
            str(v): {"rows": int((values == v).sum()), "labelled_rows": int(((values == v) & w.labelled).sum()),
                     "metrics": measured(values == v)} for v in top}
    if bucket_s and w.n and "timestamp" in w.table.column_names:
        seconds = _times_s(w.table)
        index = np.floor(seconds / bucket_s).astype(np.int64)
        for b in np.unique(index):
            mask = index == b
            report["buckets"].append({
                "start": _iso(b * bucket_s), "end": _iso((b + 1) * bucket_s), "rows": int(mask.sum()),
                "labelled_rows": int((mask & w.labelled).sum()), "metrics": measured(mask), "estimated": estimated(mask),
            })
    if calibrator is not None and labelled_total:
        on_labelled = estimated(w.labelled)
        truth = report["overall"].get("accuracy")
        if on_labelled and truth and truth["value"] is not None:
            est = on_labelled["accuracy"]["value"]
            report["comparison"]["accuracy"] = {"estimated": est, "measured": truth["value"],
                                                "abs_error": abs(est - truth["value"]), "n": truth["n"]}
        f1 = report["overall"].get("f1")
        if on_labelled and f1 and f1["value"] is not None and "f1" in on_labelled:
            est = on_labelled["f1"]["value"]
            report["comparison"]["f1"] = {"estimated": est, "measured": f1["value"], "abs_error": abs(est - f1["value"]),
                                          "n": f1["n"]}
    return report
