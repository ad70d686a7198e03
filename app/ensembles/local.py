"""An ensemble in one process: ONNX Runtime sessions of its members (and meta-learner), their
answers combined by :func:`app.ensembles.combine.combine`.

What the ensemble job scores on the holdout (the ensemble and each member, for the model
card's "beats its best member"), what the fused graph is checked against
(:func:`app.ensembles.fused.check_parity`), and, through :func:`meta_runner`, how serving runs
the meta-learner after its fan-out. Member answers have the runtimes' shape, so the combining
code is the one serving uses.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from app.ensembles.combine import combine
from app.ensembles.definition import EnsembleDefinition
from app.errors import ModelError

LABEL_OUTPUT_KEY = "matih.label_output"  # "index": a torch classifier's label output holds class indices


class _Session:
    """One ONNX model: its label (or prediction) output, its probability output if any, and
    whether its labels are class indices (torch exports of non-int, non-string classes)."""

    def __init__(self, model_bytes: bytes, what: str):
        import onnx
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelError(f"ONNX Runtime could not load {what}: {exc}") from None
        self.what = what
        self.input = self.session.get_inputs()[0].name
        outputs = [o.name for o in self.session.get_outputs()]
        # the serving runtime's rule (app/runtimes/onnx.py): label* first, else the first output
        self.label_out = next((o for o in outputs if o.lower().startswith("label")), outputs[0])
        self.proba_out = next((o for o in outputs if "prob" in o.lower() and o != self.label_out), None)
        meta = {p.key: p.value for p in onnx.load_from_string(model_bytes).metadata_props}
        self.label_is_index = meta.get(LABEL_OUTPUT_KEY) == "index"

    def run(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        wanted = [self.label_out] + ([self.proba_out] if self.proba_out else [])
        try:
            outs = self.session.run(wanted, {self.input: np.ascontiguousarray(X, dtype=np.float32)})
        except Exception as exc:
            raise ModelError(f"ONNX Runtime failed to predict with {self.what}: {exc}") from None
        pred = np.asarray(outs[0])
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        return pred, (np.asarray(outs[1]) if len(outs) > 1 else None)


def meta_runner(combiner_bytes: bytes) -> Callable[[np.ndarray], dict]:
    """The meta-learner (``combiner.onnx``) as the callable :func:`combine` takes: meta
    features (float32, rows x k) -> ``{"predictions": array, "probabilities"?: array}``."""
    sess = _Session(combiner_bytes, "the meta-learner")

    def run(features: np.ndarray) -> dict:
        pred, proba = sess.run(features)
        return {"predictions": pred} if proba is None else {"predictions": pred, "probabilities": proba}

    return run


class LocalEnsemble:
    """``defn``'s members as ONNX Runtime sessions (``member_models``: each member's ONNX bytes,
    member order) and, for kind ``meta``, the meta-learner (``combiner``)."""

    def __init__(self, defn: EnsembleDefinition, member_models: list[bytes], combiner: bytes | None = None):
        if len(member_models) != len(defn.members):
            raise ModelError(
                f"ensemble {defn.name}: {len(member_models)} member models for {len(defn.members)} members")
        if defn.combine.kind == "meta" and combiner is None:
            raise ModelError(f"ensemble {defn.name} combines with a meta-learner: combiner.onnx is needed")
        self.defn = defn
        self.members = [_Session(b, f"member {m.target}") for b, m in zip(member_models, defn.members)]
        self.meta = meta_runner(combiner) if combiner is not None else None

    def member_outputs(self, X: np.ndarray) -> list[dict]:
        """Each member's answer in the runtimes' shape (lists), probabilities for classifiers."""
        outputs = []
        for sess in self.members:
            pred, proba = sess.run(X)
            if sess.label_is_index and self.defn.classes:
                pred = np.asarray(self.defn.classes, dtype=object)[pred.astype(np.int64)]
            out = {"predictions": pred.tolist()}
            if proba is not None and self.defn.task == "classification":
                out["probabilities"] = proba.tolist()
            outputs.append(out)
        return outputs

    def predict(self, X: np.ndarray) -> dict:
        """The ensemble's answer on ``X``, as serving would give it."""
        return combine(self.defn, self.member_outputs(X), self.meta)

    def score(self, X: np.ndarray, y: np.ndarray) -> tuple[dict[str, float], list[dict[str, float]]]:
        """(the ensemble's holdout metrics, each member's, member order): the metrics of
        training jobs (``app.training.validation``), so the card can show whether the
        ensemble beats its best member."""
        outputs = self.member_outputs(X)
        combined = combine(self.defn, outputs, self.meta)
        return _metrics(self.defn, y, combined), [_metrics(self.defn, y, out) for out in outputs]


def _metrics(defn: EnsembleDefinition, y: np.ndarray, out: dict) -> dict[str, float]:
    from app.training.validation import classification_metrics, regression_metrics

    if defn.task == "classification":
        proba = out.get("probabilities")
        return classification_metrics(np.asarray(y), np.asarray(out["predictions"]),
                                      None if proba is None else np.asarray(proba), defn.classes)
    return regression_metrics(np.asarray(y), np.asarray(out["predictions"], dtype=np.float64))
