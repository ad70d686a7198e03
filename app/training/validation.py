"""Holdout metrics and validation gates.

After training, the new model and the current champion are scored on the same holdout; the
gates of the spec decide whether the new model is registered and which alias it gets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from app.training.spec import LOWER_IS_BETTER, Gate, ValidationSpec


def classification_metrics(y_true: np.ndarray, labels: np.ndarray, proba: np.ndarray | None,
                           classes: list | None = None) -> dict[str, float]:
    """accuracy, f1 (macro), and with class probabilities roc_auc (one-vs-rest for more than
    two classes) and log_loss. ``proba`` columns follow ``classes`` (sorted labels)."""
    from sklearn import metrics

    out = {
        "accuracy": float(metrics.accuracy_score(y_true, labels)),
        "f1": float(metrics.f1_score(y_true, labels, average="binary" if _binary(classes, y_true) else "macro",
                                     pos_label=(classes or sorted(set(y_true)))[-1] if _binary(classes, y_true) else 1)),
    }
    if proba is not None:
        proba = np.clip(np.asarray(proba, dtype=np.float64), 0, None)
        proba = proba / np.maximum(proba.sum(axis=1, keepdims=True), 1e-12)  # float32 sums drift from 1
        labels_all = classes if classes is not None else sorted(set(np.asarray(y_true).tolist()))
        out["log_loss"] = float(metrics.log_loss(y_true, proba, labels=labels_all))
        present = set(np.asarray(y_true).tolist())
        if len(present) > 1:
            try:
                if proba.shape[1] == 2:
                    out["roc_auc"] = float(metrics.roc_auc_score(np.asarray(y_true) == labels_all[1], proba[:, 1]))
                elif len(present) == len(labels_all):
                    out["roc_auc"] = float(metrics.roc_auc_score(y_true, proba, multi_class="ovr", labels=labels_all))
            except ValueError:
                pass  # degenerate holdout: leave roc_auc out rather than report a wrong number
    return out


def _binary(classes: list | None, y_true) -> bool:
    n = len(classes) if classes is not None else len(set(np.asarray(y_true).tolist()))
    return n == 2


def regression_metrics(y_true: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    from sklearn import metrics

    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    return {
        "rmse": float(np.sqrt(metrics.mean_squared_error(y_true, pred))),
        "mae": float(metrics.mean_absolute_error(y_true, pred)),
        "r2": float(metrics.r2_score(y_true, pred)),
    }


def onnx_outputs(model_bytes: bytes, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(labels or predictions, class probabilities or None) of an ONNX model on X."""
    import onnxruntime as ort

    sess = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    outs = sess.run(None, {sess.get_inputs()[0].name: X.astype(np.float32)})
    first = np.asarray(outs[0])
    proba = np.asarray(outs[1]) if len(outs) > 1 and np.asarray(outs[1]).ndim == 2 else None
    return first.reshape(-1) if first.ndim > 1 and first.shape[1] == 1 else first, proba


def score_onnx(model_bytes: bytes, X: np.ndarray, y: np.ndarray, task: str, classes: list | None) -> dict[str, float]:
    """Holdout metrics of an ONNX model (the form every registered version has)."""
    first, proba = onnx_outputs(model_bytes, X)
    if task == "classification":
        return classification_metrics(y, first.reshape(-1), proba, classes)
    return regression_metrics(y, first)


def better(metric: str, new: float, old: float, margin: float = 0.0) -> bool:
    """Whether ``new`` beats ``old`` by at least ``margin`` in the metric's direction."""
    if metric in LOWER_IS_BETTER:
        return new <= old - margin
    return new >= old + margin


@dataclass
class GateResult:
    metric: str
    rule: str
    value: float | None
    threshold: float | None
    passed: bool
    note: str = ""


@dataclass
class ValidationReport:
    metrics: dict[str, float]
    champion: dict[str, Any] | None  # {"version": ..., "metrics": {...}} or None
    gates: list[GateResult] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def failures(self) -> list[str]:
        return [f"{g.metric} {g.rule}: {g.note}" for g in self.gates if not g.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "metrics": self.metrics, "champion": self.champion,
                "gates": [asdict(g) for g in self.gates]}


def check_gates(spec: ValidationSpec, metrics: dict[str, float], champion: dict[str, Any] | None) -> ValidationReport:
    """Apply every gate. A metric the task does not have fails its gate with a note saying so;
    ``beat_champion_by`` passes when there is no champion to beat (the first model)."""
    report = ValidationReport(metrics=metrics, champion=champion)
    for gate in spec.gates:
        report.gates.append(_check(gate, metrics, champion))
    return report


def _check(gate: Gate, metrics: dict[str, float], champion: dict[str, Any] | None) -> GateResult:
    value = metrics.get(gate.metric)
    if gate.min is not None or gate.max is not None:
        rule, threshold = ("min", gate.min) if gate.min is not None else ("max", gate.max)
        if value is None:
            return GateResult(gate.metric, rule, None, threshold, False, f"the model has no {gate.metric} metric")
        ok = value >= threshold if rule == "min" else value <= threshold
        sign = ">=" if rule == "min" else "<="
        return GateResult(gate.metric, rule, value, threshold, ok, f"{value:.4g} {'' if ok else 'not '}{sign} {threshold:.4g}")
    margin = float(gate.beat_champion_by or 0.0)
    if champion is None:
        return GateResult(gate.metric, "beat_champion_by", value, None, True, "no champion yet")
    old = (champion.get("metrics") or {}).get(gate.metric)
    if value is None or old is None:
        return GateResult(gate.metric, "beat_champion_by", value, old, False,
                          f"{gate.metric} missing for the {'new model' if value is None else 'champion'}")
    ok = better(gate.metric, value, old, margin)
    return GateResult(gate.metric, "beat_champion_by", value, old, ok,
                      f"{value:.4g} vs champion {old:.4g} (margin {margin:g}): "
                      f"{('matches' if value == old else 'beats') if ok else 'does not beat'} it")
