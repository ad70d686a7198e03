"""How the members' answers become the ensemble's answer: one :class:`Combiner` per
``Combine.kind`` (``COMBINERS``), behind one entry point, :func:`combine`.

Pure numpy (no Ray, no MLflow, no ONNX Runtime): the Ensemble deployment calls it on the
answers its fan-out gathered, :class:`app.ensembles.local.LocalEnsemble` on the answers of
in-process sessions, and the fused graph (:mod:`app.ensembles.fused`) computes the same
numbers as ONNX ops, checked against this module by ``check_parity``. To keep the three in
step, sums over members run in member order in float64 (``w_0 * a_0 + w_1 * a_1 + ...``), the
order the fused graph uses too, so ties and arg-maxes come out the same on both paths.

A member's answer has the shape the platform's runtimes return: ``{"predictions": [...],
"probabilities": [[...]]}`` (probability columns in ``defn.classes`` order); ``None`` means
the member did not answer (the caller has already checked the quorum). Kinds that weigh
members renormalise over those that answered; ``meta`` and ``additive`` cannot do without a
member and raise :class:`~app.errors.DependencyUnavailable` naming it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from app.ensembles.definition import EnsembleDefinition
from app.errors import DependencyUnavailable, ModelError

MetaRunner = Callable[[np.ndarray], dict]


@dataclass
class Answers:
    """The members that answered, in member order: their positions in ``defn.members``, weights,
    predictions and (when given) probabilities as arrays."""

    positions: list[int]
    names: list[str]  # "name/version", for messages
    weights: list[float]
    predictions: list[np.ndarray]
    probabilities: list[np.ndarray | None]
    rows: int


class Combiner(ABC):
    """One combine kind. :meth:`combine` owns the checks every kind shares (answers line up
    with the members, enough of them answered, same row count); implementations fill in
    :meth:`combine_answers`."""

    kind: ClassVar[str]
    #: the task the kind combines ("classification", "regression"), or None for either
    task: ClassVar[str | None] = None
    #: True when the answer is undefined without every member (a meta-learner's input, a sum)
    needs_every_member: ClassVar[bool] = False

    def combine(self, defn: EnsembleDefinition, outputs: Sequence[dict | None],
                meta: MetaRunner | None = None) -> dict:
        if self.task is not None and defn.task != self.task:
            raise ModelError(f"ensemble {defn.name}: combine kind {self.kind!r} is for {self.task}, not {defn.task}")
        answers = _answers(defn, outputs, every=self.needs_every_member)
        return self.combine_answers(defn, answers, meta)

    @abstractmethod
    def combine_answers(self, defn: EnsembleDefinition, answers: Answers, meta: MetaRunner | None) -> dict:
        """The combined ``{"predictions": [...], "probabilities"?: [[...]]}`` as plain lists."""


def _answers(defn: EnsembleDefinition, outputs: Sequence[dict | None], every: bool) -> Answers:
    if len(outputs) != len(defn.members):
        raise ModelError(f"ensemble {defn.name}: {len(outputs)} member answers for {len(defn.members)} members")
    missing = [m.target for m, out in zip(defn.members, outputs) if out is None]
    if missing and (every or len(missing) == len(outputs)):
        why = "needs every member" if every else "has no member answer"
        raise DependencyUnavailable(
            f"ensemble {defn.name} ({defn.combine.kind}) {why}; not answering: {', '.join(missing)}",
            details={"missing_members": missing},
        )
    positions, names, weights, preds, probas = [], [], [], [], []
    rows = None
    for i, (member, out) in enumerate(zip(defn.members, outputs)):
        if out is None:
            continue
        if "predictions" not in out:
            raise ModelError(f"member {member.target} of ensemble {defn.name} answered without predictions")
        pred = np.asarray(out["predictions"])
        if pred.ndim == 2 and pred.shape[1] == 1:
            pred = pred[:, 0]
        proba = out.get("probabilities")
        proba = None if proba is None else np.asarray(proba, dtype=np.float64)
        if rows is None:
            rows = len(pred)
        if len(pred) != rows or (proba is not None and proba.shape[0] != rows):
            raise ModelError(f"member {member.target} of ensemble {defn.name} answered {len(pred)} rows, "
                             f"the first answering member {rows}")
        positions.append(i)
        names.append(member.target)
        weights.append(float(member.weight))
        preds.append(pred)
        probas.append(proba)
    return Answers(positions, names, weights, preds, probas, rows or 0)


def _classes(defn: EnsembleDefinition) -> list[Any]:
    if not defn.classes:
        raise ModelError(f"ensemble {defn.name} is a classifier without a class list (definition.classes)")
    return [c.item() if isinstance(c, np.generic) else c for c in defn.classes]


def label_indices(defn: EnsembleDefinition, labels: Any, member: str = "") -> np.ndarray:
    """Each label's position in ``defn.classes`` (int64). Labels may be the classes themselves
    or their string forms (JSON keys); a label outside the class list is a ModelError naming
    the member, since no combine rule can count it."""
    classes = _classes(defn)
    lookup: dict[Any, int] = {str(c): i for i, c in enumerate(classes)}
    lookup.update({c: i for i, c in enumerate(classes)})
    out = np.empty(len(labels), dtype=np.int64)
    for j, label in enumerate(np.asarray(labels).tolist()):
        idx = lookup.get(label)
        if idx is None:
            idx = lookup.get(str(label))
        if idx is None:
            raise ModelError(f"member {member or '?'} of ensemble {defn.name} predicted {label!r}, "
                             f"which is not one of the ensemble's classes {classes}")
        out[j] = idx
    return out


def _onehot(idx: np.ndarray, k: int) -> np.ndarray:
    return (idx[:, None] == np.arange(k)[None, :]).astype(np.float64)


def _weighted_sum(weights: Sequence[float], arrays: Sequence[np.ndarray]) -> np.ndarray:
    """``w_0 * a_0 + w_1 * a_1 + ...`` in member order, float64 (the fused graph's order)."""
    acc = weights[0] * np.asarray(arrays[0], dtype=np.float64)
    for w, a in zip(weights[1:], arrays[1:]):
        acc = acc + w * np.asarray(a, dtype=np.float64)
    return acc


def total_weight(weights: Sequence[float]) -> float:
    """The weights' sum in member order (what shares and means divide by)."""
    acc = float(weights[0])
    for w in weights[1:]:
        acc = acc + float(w)
    return acc


def _labels_of(defn: EnsembleDefinition, idx: np.ndarray) -> list[Any]:
    classes = _classes(defn)
    return [classes[i] for i in idx.tolist()]


def _softmax(x: np.ndarray) -> np.ndarray:
    """Row-wise softmax as ``sklearn.utils.extmath.softmax`` computes it (max subtracted first)."""
    x = x - x.max(axis=1).reshape(-1, 1)
    np.exp(x, out=x)
    return x / x.sum(axis=1).reshape(-1, 1)


class Vote(Combiner):
    """Hard voting: the class with the largest summed weight of the members voting for it.
    A tie goes to the earliest member whose label is among the tied classes (the spec's "ties
    broken by the first member"); summed weights are compared exactly. Probabilities are the
    vote shares (summed weight / the answering members' total weight)."""

    kind = "vote"
    task = "classification"

    def combine_answers(self, defn, answers, meta):
        k = len(_classes(defn))
        idx = [label_indices(defn, p, name) for p, name in zip(answers.predictions, answers.names)]
        scores = _weighted_sum(answers.weights, [_onehot(i, k) for i in idx])
        best = scores.max(axis=1)
        member_idx = np.stack(idx, axis=1)  # (rows, answering members)
        own = np.take_along_axis(scores, member_idx, axis=1)  # each member's class's score
        first_tied = np.argmax(own == best[:, None], axis=1)  # argmax of booleans: the first True
        winner = member_idx[np.arange(answers.rows), first_tied]
        return {"predictions": _labels_of(defn, winner),
                "probabilities": (scores / total_weight(answers.weights)).tolist()}


class SoftVote(Combiner):
    """The weighted mean of the members' class probabilities; the label is the class of the
    largest mean (the first such class on a tie, as ``argmax``). Soft voting, averaging of
    classifiers, bagging."""

    kind = "soft_vote"
    task = "classification"

    def combine_answers(self, defn, answers, meta):
        for proba, name in zip(answers.probabilities, answers.names):
            if proba is None:
                raise ModelError(f"member {name} of ensemble {defn.name} answered without probabilities, "
                                 "which soft voting needs")
        mean = _weighted_sum(answers.weights, answers.probabilities) / total_weight(answers.weights)
        if mean.shape[1] != len(_classes(defn)):
            raise ModelError(f"ensemble {defn.name}: members give {mean.shape[1]} probability columns for "
                             f"{len(_classes(defn))} classes")
        return {"predictions": _labels_of(defn, np.argmax(mean, axis=1)), "probabilities": mean.tolist()}


def _values(answers: Answers) -> list[np.ndarray]:
    return [np.asarray(p, dtype=np.float64).reshape(-1) for p in answers.predictions]


class Mean(Combiner):
    """The weighted mean of the members' predictions (equal weights: the plain mean)."""

    kind = "mean"
    task = "regression"

    def combine_answers(self, defn, answers, meta):
        mean = _weighted_sum(answers.weights, _values(answers)) / total_weight(answers.weights)
        return {"predictions": mean.tolist()}


class Median(Combiner):
    """The median of the members' predictions (weights play no part)."""

    kind = "median"
    task = "regression"

    def combine_answers(self, defn, answers, meta):
        return {"predictions": np.median(np.stack(_values(answers), axis=1), axis=1).tolist()}


class Samme(Combiner):
    """AdaBoost.SAMME over the members' labels with weights = the learners' alphas, as
    scikit-learn 1.9's ``AdaBoostClassifier`` computes it (``decision_function``, ``predict``,
    ``predict_proba`` in ``sklearn/ensemble/_weight_boosting.py``): class k scores
    ``sum_m(alpha_m if h_m = k else -alpha_m / (K - 1)) / sum(alpha)``; two classes collapse to
    ``score_1 - score_0`` (positive: the second class) with probabilities
    ``softmax([-d, d] / 2)``, more classes take the arg-max and ``softmax(scores / (K - 1))``.
    A missing member drops out of both sums (its alpha with it)."""

    kind = "samme"
    task = "classification"

    def combine_answers(self, defn, answers, meta):
        k = len(_classes(defn))
        if k == 1:
            return {"predictions": _labels_of(defn, np.zeros(answers.rows, dtype=np.int64)),
                    "probabilities": np.ones((answers.rows, 1)).tolist()}
        pred = None
        for p, w, name in zip(answers.predictions, answers.weights, answers.names):
            hit = _onehot(label_indices(defn, p, name), k) == 1.0
            term = np.where(hit, w, -1 / (k - 1) * w)
            pred = term if pred is None else pred + term
        pred /= np.asarray(answers.weights, dtype=np.float64).sum()
        if k == 2:
            decision = pred[:, 1] - pred[:, 0]
            labels = (decision > 0).astype(np.int64)
            proba = _softmax(np.vstack([-decision, decision]).T / 2)
        else:
            labels = np.argmax(pred, axis=1)
            proba = _softmax(pred / (k - 1))
        return {"predictions": _labels_of(defn, labels), "probabilities": proba.tolist()}


class Additive(Combiner):
    """Gradient boosting of regressors: ``bias + w_0 * h_0 + w_1 * h_1 + ...`` (bias: the
    initial prediction, scikit-learn's ``init_``; weights: the learning rate), summed in that
    order as ``GradientBoostingRegressor`` does. Every member is needed."""

    kind = "additive"
    task = "regression"
    needs_every_member = True

    def combine_answers(self, defn, answers, meta):
        acc = np.full(answers.rows, float(defn.combine.bias), dtype=np.float64)
        for w, v in zip(answers.weights, _values(answers)):
            acc = acc + w * v
        return {"predictions": acc.tolist()}


class Meta(Combiner):
    """Stacking and blending: the meta-learner (``combiner.onnx``, run by ``meta``) on
    :func:`meta_features` of the members' answers. Every member is needed."""

    kind = "meta"
    needs_every_member = True

    def combine_answers(self, defn, answers, meta):
        if meta is None:
            raise ModelError(f"ensemble {defn.name} combines with a meta-learner, and none was loaded")
        features = _meta_features(defn, answers)
        out = meta(features)
        preds = np.asarray(out["predictions"])
        if preds.ndim == 2 and preds.shape[1] == 1:
            preds = preds[:, 0]
        if defn.task == "regression":
            return {"predictions": np.asarray(preds, dtype=np.float64).tolist()}
        result: dict[str, Any] = {"predictions": _labels_of(defn, label_indices(defn, preds, "meta-learner"))}
        if out.get("probabilities") is not None:
            result["probabilities"] = np.asarray(out["probabilities"], dtype=np.float64).tolist()
        return result


COMBINERS: dict[str, Combiner] = {
    c.kind: c for c in (Vote(), SoftVote(), Mean(), Median(), Samme(), Additive(), Meta())
}


def combine(defn: EnsembleDefinition, outputs: Sequence[dict | None], meta: MetaRunner | None = None) -> dict:
    """The ensemble's answer from its members' (``outputs``, member order, ``None`` = did not
    answer): ``{"predictions": [...]}`` plus ``"probabilities"`` for classifiers when the kind
    gives them (soft_vote, vote: the vote shares, samme, meta with a probabilistic
    meta-learner). Plain lists; labels are ``defn.classes`` values. ``meta`` runs the
    meta-learner (:func:`app.ensembles.local.meta_runner`) for kind ``meta``."""
    try:
        combiner = COMBINERS[defn.combine.kind]
    except KeyError:
        raise ModelError(f"ensemble {defn.name}: no combiner for kind {defn.combine.kind!r}") from None
    return combiner.combine(defn, outputs, meta)


def _meta_features(defn: EnsembleDefinition, answers: Answers) -> np.ndarray:
    cols = []
    probabilities = defn.task == "classification" and defn.combine.meta_inputs == "probabilities"
    for pred, proba, name in zip(answers.predictions, answers.probabilities, answers.names):
        if probabilities:
            if proba is None:
                raise ModelError(f"member {name} of ensemble {defn.name} answered without probabilities, "
                                 "which its meta-learner reads")
            cols.append(proba)
        elif defn.task == "classification":
            cols.append(label_indices(defn, pred, name).astype(np.float64)[:, None])
        else:
            cols.append(np.asarray(pred, dtype=np.float64).reshape(-1, 1))
    return np.ascontiguousarray(np.concatenate(cols, axis=1), dtype=np.float32)


def meta_features(defn: EnsembleDefinition, outputs: Sequence[dict | None]) -> np.ndarray:
    """The meta-learner's input (float32, rows x k), the one layout the stacking/blending job
    fits on and serving feeds: with ``meta_inputs`` "probabilities" (classifiers) each member's
    probability matrix, all classes, concatenated in member order (k = members x classes);
    with "predictions" one column per member: the label's index in ``defn.classes`` for
    classifiers, the predicted value for regressors. Every member must have answered."""
    return _meta_features(defn, _answers(defn, outputs, every=True))
