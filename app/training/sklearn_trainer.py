"""scikit-learn training: fit, evaluate on a holdout, log to MLflow, convert to ONNX, check
parity, register, and give the first version the alias ``champion``.

Idempotent by job id: a re-run of a job whose version is already registered returns that
version instead of registering a second one.
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from app.datasets import load_dataset, split_features
from app.errors import InvalidInput, ModelError
from app.registry.lineage import code_version, frame_sha256
from app.registry.mlflow_registry import (
    TAG_CLASSES,
    TAG_CODE_VERSION,
    TAG_DATASET_SHA256,
    TAG_DATASET_URI,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_JOB,
    TAG_PARITY,
    TAG_TASK,
    TAG_VALIDATION,
    ensure_experiment,
)
from app.schemas import TrainingJobSpec
from app.settings import Settings
from app.storage.s3 import configure_s3_env

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


def build_estimator(spec: TrainingJobSpec, settings: Settings):
    cls = resolve_estimator(spec.estimator, settings.jobs.allowed_estimators)
    try:
        est = cls(**spec.hyperparameters)
        est.get_params()
    except TypeError as exc:
        raise InvalidInput(f"hyperparameters do not fit {spec.estimator}: {exc}", details={"field": "hyperparameters"}) from None
    return est


def evaluate(est, X, y, is_classifier: bool) -> dict[str, float]:
    from sklearn import metrics

    pred = est.predict(X)
    if is_classifier:
        out = {
            "accuracy": float(metrics.accuracy_score(y, pred)),
            "f1_macro": float(metrics.f1_score(y, pred, average="macro")),
        }
        if hasattr(est, "predict_proba"):
            proba = est.predict_proba(X)
            out["log_loss"] = float(metrics.log_loss(y, proba, labels=est.classes_))
        return out
    mse = metrics.mean_squared_error(y, pred)
    return {
        "rmse": float(np.sqrt(mse)),
        "mae": float(metrics.mean_absolute_error(y, pred)),
        "r2": float(metrics.r2_score(y, pred)),
    }


def to_onnx(est, X_sample: np.ndarray, is_classifier: bool):
    from skl2onnx import to_onnx as _to_onnx

    options = {id(est): {"zipmap": False}} if is_classifier else None
    try:
        return _to_onnx(est, X_sample[:1].astype(np.float32), options=options, target_opset={"": 17, "ai.onnx.ml": 3})
    except Exception as exc:
        raise ModelError(f"skl2onnx cannot convert {type(est).__name__}: {exc}") from None


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


def _existing_version(client, name: str, job_id: str):
    from mlflow.exceptions import MlflowException

    try:
        for mv in client.search_model_versions(f"name = '{name}'"):
            if (mv.tags or {}).get(TAG_JOB) == job_id:
                return mv
    except MlflowException:
        return None
    return None


def train_sklearn(spec: TrainingJobSpec, settings: Settings, job_id: str, report: Reporter) -> dict[str, Any]:
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient
    from mlflow.models import infer_signature
    from sklearn.base import is_classifier as _is_classifier
    from sklearn.model_selection import train_test_split

    est = build_estimator(spec, settings)
    frame = load_dataset(spec.dataset.uri)
    X, y = split_features(frame, spec.dataset.target, spec.dataset.features)
    is_clf = _is_classifier(est)
    stratify = y if is_clf and y.nunique() > 1 and y.value_counts().min() >= 2 else None
    X_train, X_test, y_train, y_test = train_test_split(
        X, y, test_size=spec.dataset.test_size, random_state=spec.dataset.seed, stratify=stratify
    )
    report({"stage": "fitting", "rows_train": len(X_train), "rows_holdout": len(X_test)}, f"fitting {spec.estimator}")
    try:
        est.fit(X_train.to_numpy(), y_train.to_numpy())
    except ValueError as exc:
        raise InvalidInput(f"fit failed: {exc}", details={"field": "hyperparameters"}) from None
    metrics = evaluate(est, X_test.to_numpy(), y_test.to_numpy(), is_clf)
    report({"stage": "converting", "metrics": metrics}, f"holdout metrics {json.dumps(metrics)}")

    onnx_model = to_onnx(est, X_train.to_numpy(), is_clf)
    max_diff, agreement = onnx_parity(onnx_model, est, X_test.to_numpy(), is_clf)
    report({"stage": "parity", "onnx_max_abs_diff": max_diff}, f"ONNX parity: max |diff| {max_diff:.3g}")
    # Probabilities live in [0, 1]; regression outputs are compared relative to their scale, since
    # ONNX computes in float32 where scikit-learn uses float64.
    scale = 1.0 if is_clf else max(1.0, float(np.max(np.abs(est.predict(X_test.to_numpy())))))
    if max_diff > settings.jobs.onnx_parity_tolerance * scale or agreement < 1.0:
        raise ModelError(
            f"ONNX conversion differs from scikit-learn on the holdout (max |diff| {max_diff:.3g}, "
            f"label agreement {agreement:.3f}); tolerance is {settings.jobs.onnx_parity_tolerance} x {scale:.3g}"
        )

    configure_s3_env(settings)  # artifacts may go to s3:// (MLflow reads the endpoint from the environment)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    feature_names = [str(c) for c in X.columns]
    classes = [c.item() if hasattr(c, "item") else c for c in getattr(est, "classes_", [])] if is_clf else None

    if spec.register_as:
        prior = _existing_version(client, spec.register_as, job_id)
        if prior is not None:  # a retry after the version was registered: do not register twice
            report({"stage": "done"}, f"version {prior.version} was registered by an earlier attempt")
            return {
                "run_id": prior.run_id,
                "model_name": prior.name,
                "model_version": str(prior.version),
                "metrics": metrics,
                "onnx_max_abs_diff": max_diff,
            }

    exp_id = ensure_experiment(client, settings)
    with mlflow.start_run(experiment_id=exp_id, run_name=spec.name, tags={TAG_JOB: job_id}) as run:
        mlflow.log_params({"estimator": spec.estimator, **{k: str(v) for k, v in spec.hyperparameters.items()}})
        mlflow.log_params({"dataset": spec.dataset.uri, "rows_train": len(X_train), "rows_holdout": len(X_test)})
        mlflow.log_metrics({**metrics, "onnx_max_abs_diff": max_diff})
        sample = X_test.to_numpy()[:5]
        signature = infer_signature(sample, est.predict(sample))
        report({"stage": "registering"}, "logging the ONNX model to MLflow")
        info = mlflow.onnx.log_model(
            onnx_model,
            name="model",
            signature=signature,
            registered_model_name=spec.register_as,
            pip_requirements=["onnxruntime"],
            save_as_external_data=False,
        )
    result: dict[str, Any] = {
        "run_id": run.info.run_id,
        "model_uri": info.model_uri,
        "metrics": metrics,
        "onnx_max_abs_diff": max_diff,
    }
    if spec.register_as:
        version = str(info.registered_model_version)
        tags = {
            TAG_JOB: job_id,
            TAG_FORMAT: "onnx",
            TAG_PARITY: repr(max_diff),
            TAG_FEATURES: json.dumps(feature_names),
            TAG_TASK: "classification" if is_clf else "regression",
            TAG_VALIDATION: "passed",  # the ONNX parity check above passed, or the job would have failed
            TAG_DATASET_URI: spec.dataset.uri,
            TAG_DATASET_SHA256: frame_sha256(frame),
            TAG_CODE_VERSION: code_version(),
        }
        if classes is not None:
            tags[TAG_CLASSES] = json.dumps(classes)
        for key, value in tags.items():
            client.set_model_version_tag(spec.register_as, version, key, value)
        aliases = []
        rm = client.get_registered_model(spec.register_as)
        if "champion" not in (rm.aliases or {}):
            client.set_registered_model_alias(spec.register_as, "champion", version)
            aliases.append("champion")
        result.update({"model_name": spec.register_as, "model_version": version, "aliases": aliases})
        report({"stage": "done"}, f"registered {spec.register_as} version {version} {aliases or ''}".rstrip())
    return result
