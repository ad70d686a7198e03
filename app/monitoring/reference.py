"""Reference profiles as artifacts of a version: made at registration from the training data
(:func:`training_profile`, called by the training pipeline), or on demand from a dataset
(:func:`dataset_profile`, the ``reference_profile`` job behind ``POST
/v1/models/{name}/versions/{v}/profile``), and read by every monitor run (:func:`load_profile`).

The profile is ``monitoring/reference_profile.json`` in the MLflow run of the version, so it
lives, is copied and is deleted with the version's other artifacts; monitors never re-read
training data."""

from __future__ import annotations

import json
import threading
from typing import Any

import numpy as np
import pyarrow as pa
from cachetools import LRUCache

from app.errors import InvalidInput, NotFound

__all__ = ["PROFILE_PATH", "PROFILE_KIND", "training_profile", "dataset_profile", "load_profile", "save_profile"]

PROFILE_PATH = "monitoring/reference_profile.json"
PROFILE_KIND = "reference_profile"  # the job kind of POST .../profile
_cache: LRUCache = LRUCache(maxsize=32)
_lock = threading.Lock()


def _profile_args(settings) -> dict[str, Any]:
    mon = settings.monitoring
    return {"quantiles": mon.profile_quantiles, "exact_rows": mon.profile_exact_rows,
            "max_categories": mon.profile_max_categories}


def training_profile(settings, *, X_train: np.ndarray, feature_names: list[str], X_holdout: np.ndarray,
                     y_holdout: np.ndarray, model_bytes: bytes, task: str, classes: list | None,
                     source: dict[str, Any]) -> dict[str, Any]:
    """The profile of a training job's version: features from the training split, predictions
    and probabilities of the ONNX model on the holdout (what CBPE calibrates on)."""
    from app.monitoring.profile import add_predictions, build_profile
    from app.training.validation import onnx_outputs

    table = pa.table({name: np.asarray(X_train[:, i], dtype=np.float64) for i, name in enumerate(feature_names)})
    profile = build_profile(table, source=source, **_profile_args(settings))
    predictions, probabilities = onnx_outputs(model_bytes, X_holdout)
    return add_predictions(profile, task=task, classes=classes, predictions=np.asarray(predictions).reshape(-1),
                           labels=np.asarray(y_holdout).reshape(-1), probabilities=probabilities,
                           holdout_rows=settings.monitoring.profile_holdout_rows)


def save_profile(client, run_id: str, profile: dict[str, Any]) -> str:
    """Store ``profile`` in ``run_id`` (replacing an earlier one); returns its artifact URI."""
    client.log_dict(run_id, profile, PROFILE_PATH)
    with _lock:
        for key in [k for k, v in _cache.items() if v[0] == run_id]:
            _cache.pop(key, None)
    return f"runs:/{run_id}/{PROFILE_PATH}"


def _model_version(settings, model: str, version: str):
    """(MLflow client, the model version); NotFound when it does not exist."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    from app.storage.s3 import configure_s3_env

    configure_s3_env(settings)
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    try:
        return client, client.get_model_version(model, str(version))
    except MlflowException:
        raise NotFound(f"model version {model}/{version} does not exist") from None


def load_profile(settings, model: str, version: str) -> dict[str, Any]:
    """The reference profile of ``model/version``; NotFound (saying how to make one) when the
    version has none. Cached per process by (model, version, run)."""
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    _client, mv = _model_version(settings, model, version)
    key = (model, str(version), mv.run_id)
    with _lock:
        hit = _cache.get(key)
    if hit is not None:
        return hit[1]
    if not mv.run_id:
        raise NotFound(f"{model}/{version} has no run to hold a reference profile; POST "
                       f"/v1/models/{model}/versions/{version}/profile with a dataset makes one")
    try:
        text = mlflow.artifacts.load_text(f"runs:/{mv.run_id}/{PROFILE_PATH}")
    except (MlflowException, OSError):
        raise NotFound(f"{model}/{version} has no reference profile (it was registered without training data); "
                       f"POST /v1/models/{model}/versions/{version}/profile with a dataset makes one",
                       details={"model": model, "version": str(version)}) from None
    profile = json.loads(text)
    with _lock:
        _cache[key] = (mv.run_id, profile)
    return profile


def dataset_profile(settings, model: str, version: str, spec: dict[str, Any], report) -> dict[str, Any]:
    """The ``reference_profile`` job: profile ``spec["dataset"]`` (a parquet or CSV file under
    the data roots) for ``model/version`` and store it on the version. With ``spec["target"]``
    (the label column) and an ONNX version, the version's predictions on the dataset's rows
    are profiled too (prediction drift, CBPE's calibration)."""
    from app.datasets import load_dataset
    from app.monitoring.profile import add_predictions, build_profile
    from app.registry.mlflow_registry import TAG_CLASSES, TAG_FEATURES, TAG_FORMAT, TAG_TASK

    client, mv = _model_version(settings, model, version)
    tags = mv.tags or {}
    report({"stage": "reading"}, f"reading {spec['dataset']}")
    table = pa.Table.from_pandas(load_dataset(spec["dataset"], settings), preserve_index=False)
    features = json.loads(tags[TAG_FEATURES]) if TAG_FEATURES in tags else [
        c for c in table.column_names if c != spec.get("target")]
    missing = [f for f in features if f not in table.column_names]
    if missing:
        raise InvalidInput(f"the dataset lacks the version's features {missing[:10]}", details={"field": "dataset"})
    report({"stage": "profiling", "rows": table.num_rows}, f"profiling {table.num_rows} rows x {len(features)} features")
    profile = build_profile(table.select(features), categorical=spec.get("categorical") or (),
                            source={"dataset_uri": spec["dataset"], "rows": table.num_rows},
                            **_profile_args(settings))
    target = spec.get("target")
    if target:
        if target not in table.column_names:
            raise InvalidInput(f"the dataset has no target column {target!r}", details={"field": "target"})
        if tags.get(TAG_FORMAT, "onnx") == "onnx":
            import mlflow.onnx

            from app.training.validation import onnx_outputs

            proto = mlflow.onnx.load_model(f"models:/{model}/{version}")
            X = np.column_stack([np.asarray(table.column(f).to_numpy(zero_copy_only=False), dtype=np.float32)
                                 for f in features])
            predictions, probabilities = onnx_outputs(proto.SerializeToString(), X)
            task = tags.get(TAG_TASK) or ("classification" if probabilities is not None else "regression")
            classes = json.loads(tags[TAG_CLASSES]) if TAG_CLASSES in tags else None
            profile = add_predictions(profile, task=task, classes=classes,
                                      predictions=np.asarray(predictions).reshape(-1),
                                      labels=np.asarray(table.column(target).to_numpy(zero_copy_only=False)),
                                      probabilities=probabilities,
                                      holdout_rows=settings.monitoring.profile_holdout_rows)
    run_id = mv.run_id
    if not run_id:
        raise InvalidInput(f"{model}/{version} has no MLflow run to store the profile in")
    uri = save_profile(client, run_id, profile)
    report({"stage": "done"}, f"stored {uri}")
    return {"model": model, "version": str(version), "profile_uri": uri, "rows": profile.get("rows"),
            "features": len(profile.get("features") or {}), "prediction": profile.get("prediction") is not None}
