"""scikit-learn pieces of a training job: the allow-listed estimator, its ONNX conversion and
the parity check. The job itself (data, MLflow, gates, registration) is
``app.training.pipeline.run_training``."""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from app.errors import InvalidInput, ModelError
from app.settings import Settings
from app.training.spec import TrainingJobSpec

log = logging.getLogger(__name__)
Reporter = Callable[[dict[str, Any], str | None], None]


def resolve_estimator(path: str, allowed: list[str]) -> type:
    """Import an estimator class named on the allow-list; anything else is refused."""
    if path not in allowed:
        raise InvalidInput(
            f"estimator {path!r} is not allowed; choose one of: {', '.join(allowed)}",
            details={"field": "estimator"},
        )
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise InvalidInput(f"estimator {path!r} cannot be imported here", details={"field": "estimator"}) from None


def build_estimator(spec: TrainingJobSpec, settings: Settings, hyperparameters: dict[str, Any] | None = None):
    """The spec's estimator with ``hyperparameters`` (default: the spec's; a Tune trial passes its own)."""
    cls = resolve_estimator(spec.estimator, settings.jobs.allowed_estimators)
    params = spec.hyperparameters if hyperparameters is None else hyperparameters
    try:
        est = cls(**params)
        est.get_params()
    except TypeError as exc:
        raise InvalidInput(f"hyperparameters do not fit {spec.estimator}: {exc}", details={"field": "hyperparameters"}) from None
    return est


def to_onnx(est, X_sample: np.ndarray, is_classifier: bool):
    """``est`` as an ONNX model (classifiers without ZipMap: labels and a probability
    matrix), tree-ensemble classifiers compacted (app/training/onnx_compact.py)."""
    from skl2onnx import to_onnx as _to_onnx

    from app.training.onnx_compact import compact_tree_ensembles

    options = {id(est): {"zipmap": False}} if is_classifier else None
    try:
        model = _to_onnx(est, X_sample[:1].astype(np.float32), options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    except Exception as exc:
        raise ModelError(f"skl2onnx cannot convert {type(est).__name__}: {exc}") from None
    compact_tree_ensembles(model)  # zero leaf weights out: smaller, opens and predicts faster
    return model


def onnx_parity(onnx_model, est, X: np.ndarray, is_classifier: bool) -> tuple[float, float]:
    """(max |ONNX - native| over probabilities or predictions, share of equal labels)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(onnx_model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: X.astype(np.float32)})
    if is_classifier:
        labels = np.asarray(outs[0]).reshape(-1)
        agree = float(np.mean(labels == est.predict(X)))
        if len(outs) > 1 and hasattr(est, "predict_proba"):
            return float(np.max(np.abs(np.asarray(outs[1]) - est.predict_proba(X)))), agree
        return 0.0 if agree == 1.0 else 1.0, agree
    pred = np.asarray(outs[0]).reshape(-1)
    return float(np.max(np.abs(pred - est.predict(X)))), 1.0


def train_sklearn(spec: TrainingJobSpec, settings: Settings, job_id: str, report: Reporter) -> dict[str, Any]:
    """A scikit-learn job end to end (see app.training.pipeline.run_training)."""
    from app.training.pipeline import run_training

    return run_training(spec, settings, job_id, report)
