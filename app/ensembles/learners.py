"""The learning pieces of an ensemble job, pure functions over numpy arrays and scikit-learn
estimators (no MLflow, no store, no Ray), so each is checked on its own by a unit test:

* :func:`out_of_fold`: the K-fold out-of-fold predictions stacking fits its meta-learner on,
  with a record per fold that proves no member saw the rows its meta-features came from;
* :func:`bootstrap_indices` and :func:`fit_replica`: one bagging member (a Ray task each in
  :mod:`app.ensembles.training`);
* :func:`adaboost` and :func:`gradient_boosting`: boosting with scikit-learn's own
  implementations (``AdaBoostClassifier``, SAMME; ``GradientBoostingRegressor``), taken apart
  into members and weights;
* :func:`convert`: any fitted member or meta-learner as ONNX, with the parity check.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from app.errors import InvalidInput, ModelError

#: fit_predict(train_rows, held_out_rows) -> the meta-features of the held-out rows (n_held_out, k),
#: from models fit on train_rows only.
FitPredict = Callable[[np.ndarray, np.ndarray], np.ndarray]
#: Hyperparameters of a GradientBoostingRegressor that shape its trees (base.hyperparameters).
TREE_PARAMS: frozenset[str] = frozenset(
    {"max_depth", "min_samples_split", "min_samples_leaf", "min_weight_fraction_leaf", "max_features",
     "max_leaf_nodes", "min_impurity_decrease", "ccp_alpha", "criterion"}
)


def rows_sha256(rows: np.ndarray) -> str:
    """A fingerprint of a set of row indices (order does not matter)."""
    return hashlib.sha256(np.sort(np.asarray(rows, dtype=np.int64)).tobytes()).hexdigest()


def out_of_fold(fit_predict: FitPredict, X: np.ndarray, y: np.ndarray, folds: int, seed: int,
                *, stratified: bool = True) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Out-of-fold meta-features of every row of ``X``: K folds (``StratifiedKFold`` for
    classification, shuffled with ``seed``); for each fold, ``fit_predict`` fits on the other
    K-1 folds and predicts the held-out one. Each row's meta-features thus come from models
    that never saw it, so the meta-learner learns how members behave on unseen rows (the
    reason stacking beats a meta-learner fit on in-sample predictions).

    Returns (the (n_rows, k) float32 matrix, one record per fold: its held-out row indices, the
    number and the sha256 of the rows its models were fit on)."""
    from sklearn.model_selection import KFold, StratifiedKFold

    splitter = (StratifiedKFold if stratified else KFold)(n_splits=folds, shuffle=True, random_state=seed)
    oof: np.ndarray | None = None
    filled = np.zeros(len(X), dtype=bool)
    records: list[dict[str, Any]] = []
    for k, (fit_rows, held_out) in enumerate(splitter.split(X, y)):
        block = np.asarray(fit_predict(fit_rows, held_out), dtype=np.float32)
        block = block.reshape(len(held_out), -1)
        if oof is None:
            oof = np.zeros((len(X), block.shape[1]), dtype=np.float32)
        oof[held_out] = block
        filled[held_out] = True
        records.append({"fold": k, "held_out": [int(i) for i in held_out], "fit_rows": int(len(fit_rows)),
                        "fit_rows_sha256": rows_sha256(fit_rows)})
    if oof is None or not filled.all():  # KFold covers every row once; anything else is a bug here
        raise ModelError("out-of-fold predictions do not cover every training row")
    return oof, records


def check_no_leakage(records: Sequence[dict[str, Any]], n_rows: int) -> None:
    """What a job's result lets anyone re-check: the folds' held-out sets partition the rows and
    each fold's models were fit on exactly the other rows (their sha256 matches)."""
    seen = np.zeros(n_rows, dtype=int)
    for r in records:
        held = np.asarray(r["held_out"], dtype=np.int64)
        seen[held] += 1
        others = np.setdiff1d(np.arange(n_rows), held)
        if rows_sha256(others) != r["fit_rows_sha256"] or len(others) != r["fit_rows"]:
            raise ModelError(f"fold {r['fold']}: its models were not fit on exactly the rows outside it")
    if not (seen == 1).all():
        raise ModelError("the folds' held-out rows do not partition the training rows")


def bootstrap_indices(n_rows: int, n_replicas: int, seed: int, y: np.ndarray | None = None) -> list[np.ndarray]:
    """One bootstrap sample (n_rows drawn with replacement) per replica, from a numpy RNG
    seeded with ``seed``. With ``y`` (classification) the sample is stratified
    (``sklearn.utils.resample``), so every replica sees every class and all members share
    one class list (the ensemble's probability columns)."""
    from sklearn.utils import resample

    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, 2**31 - 1, size=n_replicas)
    rows = np.arange(n_rows)
    return [np.asarray(resample(rows, replace=True, n_samples=n_rows, random_state=int(s), stratify=y))
            for s in seeds]


def convert(est, X_fit: np.ndarray, X_check: np.ndarray, is_classifier: bool, tolerance: float,
            what: str) -> tuple[bytes, float]:
    """``est`` as ONNX bytes (classifiers: label + probabilities, no ZipMap) and the max
    |ONNX - native| on ``X_check``; a conversion past ``tolerance`` (relative to the largest
    |prediction| for regressors, as for a training job) or with any differing label is a
    ModelError naming ``what``."""
    from app.onnx.sklearn_export import onnx_parity, to_onnx

    X_fit, X_check = np.asarray(X_fit, dtype=np.float32), np.asarray(X_check, dtype=np.float32)
    model = to_onnx(est, X_fit, is_classifier)
    diff, agreement = onnx_parity(model, est, X_check, is_classifier)
    scale = 1.0 if is_classifier else max(1.0, float(np.max(np.abs(est.predict(X_check)))))
    if diff > tolerance * scale or agreement < 1.0:
        raise ModelError(f"{what}: the ONNX conversion differs from the native model (max |diff| {diff:.3g}, label "
                         f"agreement {agreement:.3f}; tolerance {tolerance} x {scale:.3g})")
    return model.SerializeToString(), diff


@dataclass
class Replica:
    """One trained bagging member and when and where it trained (the parallelism evidence)."""

    index: int
    onnx: bytes
    parity: float
    start: float  # time.time() at the task's start and end
    end: float
    pid: int
    unique_rows: int  # distinct training rows in its bootstrap sample (about 63% of them)


def fit_replica(index: int, est, X: np.ndarray, y: np.ndarray, rows: np.ndarray, is_classifier: bool,
                tolerance: float, X_check: np.ndarray | None = None) -> Replica:
    """Fit a fresh clone of ``est`` on the bootstrap rows and convert it, checking parity on
    ``X_check`` (the holdout; default X): the body of one bagging task (a plain function, so the
    sequential path and the benchmark run the same code)."""
    from sklearn.base import clone

    start = time.time()
    member = clone(est)
    try:
        member.fit(X[rows], y[rows])
    except ValueError as exc:
        raise InvalidInput(f"bagging member {index}: fit failed: {exc}", details={"field": "base.hyperparameters"}) \
            from None
    onnx, diff = convert(member, X, X if X_check is None else X_check, is_classifier, tolerance,
                         f"bagging member {index}")
    return Replica(index, onnx, diff, start, time.time(), os.getpid(), int(len(np.unique(rows))))


def fit_torch_replica(index: int, model_spec: dict[str, Any], hyperparameters: dict[str, Any], data, rows: np.ndarray,
                      seed: int) -> Replica:
    """A torch bagging member: the in-process training loop of strategy ``single`` (what a Tune
    trial runs) on the bootstrap rows, exported to ONNX with its parity check. ``data`` is the
    job's PreparedData with labels encoded as indices."""
    from dataclasses import replace

    from app.onnx.torch_export import export_onnx
    from app.training.spec import TrainingJobSpec
    from app.training.torch_loop import train_in_process

    start = time.time()
    spec = TrainingJobSpec.model_validate({
        "name": f"bagging-member-{index}", "framework": "torch", "model": model_spec, "task": data.task,
        "hyperparameters": {**hyperparameters, "seed": seed},
        "dataset": {"uri": data.dataset_uri or "builtin://iris", "target": "target"},
    })
    boot = replace(data, X_train=data.X_train[rows], y_train=data.y_train[rows])
    model, _ = train_in_process(spec, boot, spec.hyperparameters, lambda epoch, metrics: None)
    proto, diff = export_onnx(model, boot)
    return Replica(index, proto.SerializeToString(), float(diff), start, time.time(), os.getpid(),
                   int(len(np.unique(rows))))


def adaboost(base, X: np.ndarray, y: np.ndarray, n_estimators: int, learning_rate: float,
             seed: int) -> tuple[Any, list[Any], list[float]]:
    """scikit-learn's ``AdaBoostClassifier`` (SAMME, the only algorithm it has) over ``base``:
    (the fitted booster, its learners, their weights ``estimator_weights_``). AdaBoost stops
    early when a learner is perfect or no better than chance; only the learners it kept count."""
    from sklearn.base import is_classifier
    from sklearn.ensemble import AdaBoostClassifier

    if not is_classifier(base):
        raise InvalidInput(f"boosting a classification: base.estimator {type(base).__name__} is not a classifier",
                           details={"field": "base.estimator"})
    ada = AdaBoostClassifier(estimator=base, n_estimators=n_estimators, learning_rate=learning_rate,
                             random_state=seed)
    try:
        ada.fit(X, y)
    except (ValueError, TypeError) as exc:  # e.g. a learner that takes no sample_weight
        raise InvalidInput(f"AdaBoost over {type(base).__name__} failed: {exc}", details={"field": "base"}) from None
    kept = len(ada.estimators_)
    return ada, list(ada.estimators_), [float(w) for w in ada.estimator_weights_[:kept]]


def gradient_boosting(base_path: str, hyperparameters: dict[str, Any], X: np.ndarray, y: np.ndarray,
                      n_estimators: int, learning_rate: float, seed: int) -> tuple[Any, list[Any], float]:
    """scikit-learn's ``GradientBoostingRegressor`` (squared error: each tree fits the residuals
    of the ones before): (the fitted booster, its trees ``estimators_[:, 0]``, the initial
    prediction ``init_``'s constant). Its prediction is ``bias + learning_rate * sum(tree(X))``,
    so each tree is a member of weight ``learning_rate`` (combine kind ``additive``)."""
    from sklearn.ensemble import GradientBoostingRegressor

    if base_path != "sklearn.tree.DecisionTreeRegressor":
        raise InvalidInput(f"gradient boosting grows regression trees: base.estimator must be "
                           f"sklearn.tree.DecisionTreeRegressor, not {base_path}", details={"field": "base.estimator"})
    unknown = sorted(set(hyperparameters) - TREE_PARAMS)
    if unknown:
        raise InvalidInput(f"base.hyperparameters {unknown} do not shape gradient boosting's trees; use "
                           f"{sorted(TREE_PARAMS)}", details={"field": "base.hyperparameters"})
    gbr = GradientBoostingRegressor(n_estimators=n_estimators, learning_rate=learning_rate, random_state=seed,
                                    **{"max_depth": 3, **hyperparameters})
    try:
        gbr.fit(X, y)
    except ValueError as exc:
        raise InvalidInput(f"gradient boosting failed: {exc}", details={"field": "base.hyperparameters"}) from None
    return gbr, list(gbr.estimators_[:, 0]), float(np.asarray(gbr.init_.constant_).reshape(-1)[0])
