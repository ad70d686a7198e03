"""scikit-learn pieces of a training job: the allow-listed estimator. Its ONNX conversion and
the parity check are ``app.onnx.sklearn_export``; the job itself (data, MLflow, gates,
registration) is ``app.training.pipeline.run_training``."""

from __future__ import annotations

import importlib
from typing import Any

from app.errors import InvalidInput
from app.settings import Settings
from app.training.spec import TrainingJobSpec


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
