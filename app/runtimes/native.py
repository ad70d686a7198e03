"""The native runtime: serves scikit-learn (skops, or pickle-based only when trusted) and
TorchScript models in their own framework, for models ONNX cannot express or when an
endpoint wants the original.

Safety lives in :func:`app.registry.formats.load_native`: a pickle-based version is never
unpickled unless the metadata store holds an admin's trust record for it and the file's bytes
hash to the record's sha256 (the loader passes it in as ``metadata["trusted_sha256"]``; MLflow
tags decide nothing), ``Conflict`` with code ``untrusted_model`` otherwise; skops files trust only the types the registry accepted when they were
registered; TorchScript goes through ``torch.jit.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from app.errors import ModelError
from app.runtimes.base import ModelRuntime, RuntimeConfig
from app.serving.signature import ModelSignature


class NativeConfig(RuntimeConfig):
    """Options of the ``native`` runtime."""

    intra_op_threads: int | None = Field(
        None, ge=0, description="torch threads for a TorchScript model (at least 1). Default: serving.onnx_intra_op_threads."
    )


class NativeModelRuntime(ModelRuntime):
    name = "native"
    Config = NativeConfig
    config: NativeConfig

    def load(self, model_dir: Path, metadata: dict[str, Any]) -> None:
        from app.registry.formats import load_native

        loaded = load_native(Path(model_dir), metadata)
        self._format = loaded.format
        self._model = loaded.model
        task = metadata.get("task")
        classes = metadata.get("classes")
        if loaded.format != "torchscript":
            from sklearn.base import is_classifier

            task = task or ("classification" if is_classifier(loaded.model) else "regression")
            if classes is None and hasattr(loaded.model, "classes_"):
                classes = [c.item() if hasattr(c, "item") else c for c in loaded.model.classes_]
        else:
            import torch

            torch.set_num_threads(max(1, self.serving_default(self.config.intra_op_threads, "onnx_intra_op_threads")))
        self._task = task or "regression"
        self.signature = ModelSignature(
            n_features=loaded.n_features,
            feature_names=metadata.get("feature_names"),
            task=self._task,
            classes=classes,
            extra={"format": loaded.format},
        )
        self.ready = True

    def predict(self, features: np.ndarray, *, probabilities: bool = False) -> dict[str, Any]:
        try:
            if self._format == "torchscript":
                return self._predict_torch(features, probabilities)
            return self._predict_sklearn(features, probabilities)
        except Exception as exc:
            raise ModelError(f"the {self._format} model failed to predict: {exc}") from None

    def _predict_sklearn(self, features: np.ndarray, probabilities: bool) -> dict[str, Any]:
        X = features.astype(np.float64)
        preds = np.asarray(self._model.predict(X))
        out: dict[str, Any] = {"predictions": preds.tolist()}
        if probabilities and hasattr(self._model, "predict_proba"):
            out["probabilities"] = np.asarray(self._model.predict_proba(X)).tolist()
        return out

    def _predict_torch(self, features: np.ndarray, probabilities: bool) -> dict[str, Any]:
        import torch

        with torch.no_grad():
            scores = self._model(torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))).numpy()
        if self._task != "classification":
            if scores.ndim == 2 and scores.shape[1] == 1:
                scores = scores[:, 0]
            return {"predictions": scores.tolist()}
        # Class indices, as the ONNX export of the same model answers (matih.classes names them).
        preds = scores.argmax(axis=1).tolist()
        out: dict[str, Any] = {"predictions": preds}
        if probabilities:
            shifted = scores - scores.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            out["probabilities"] = (exp / exp.sum(axis=1, keepdims=True)).tolist()
        return out
