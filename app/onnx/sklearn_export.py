"""scikit-learn estimators as ONNX, and the parity check between the two. A training job
converts its fitted estimator (``app.training.pipeline``); the registry converts uploaded
skops files and trusted pickles (``app.registry.formats``)."""

from __future__ import annotations

import numpy as np

from app.errors import ModelError


def to_onnx(est, X_sample: np.ndarray, is_classifier: bool):
    """``est`` as an ONNX model (classifiers without ZipMap: labels and a probability
    matrix), tree-ensemble classifiers compacted (app/onnx/compact.py)."""
    from skl2onnx import to_onnx as _to_onnx

    from app.onnx.compact import compact_tree_ensembles

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
