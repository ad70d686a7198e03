"""An ensemble version as the registry stores it: members pinned to versions and the rule
that combines their answers. It is what serving reads (the Gateway from the version's tag
``matih.ensemble``, no download needed), what the fused graph is built from, and what the
model card shows.

Artifacts of an ensemble version (the MLflow model's directory):

* ``ensemble.json``: this definition (``EnsembleDefinition.to_json``);
* ``combiner.onnx``: the meta-learner (stacking, blending) -- its input is the members'
  outputs laid out by :func:`app.ensembles.combine.meta_features`;
* ``model.onnx`` (through ``mlflow.onnx``) only when a fused graph exists: then the version
  is also an ordinary ONNX model, which the normal ONNX runtime serves (config.ensemble
  ``fused``).

Combine kinds (``Combine.kind``), in :mod:`app.ensembles.combine`:

=============  ==============================================================================
``vote``       hard voting: the (weighted) majority of the members' labels; a tie goes to the
               earliest member whose label is among the tied ones
``soft_vote``  the weighted mean of the members' class probabilities; the label is the
               class of the largest mean (soft voting, averaging of classifiers, bagging)
``mean``       the weighted mean of the members' predictions (regressors; equal weights = mean)
``median``     the median of the members' predictions
``meta``       the meta-learner (``combiner.onnx``) on the members' outputs
``samme``      AdaBoost.SAMME (boosting of classifiers): class k scores sum(alpha_m * [h_m = k]);
               probabilities as scikit-learn's ``AdaBoostClassifier.predict_proba``
``additive``   gradient boosting of regressors: ``bias + sum(weight_m * h_m)``
=============  ==============================================================================
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

KIND_TAG = "matih.kind"  # "ensemble" on the version (and the registered model) of an ensemble
DEFINITION_TAG = "matih.ensemble"  # the definition's JSON, compact (what serving reads)
ENSEMBLE_FORMAT = "ensemble"  # matih.format of an ensemble version without a fused graph
DEFINITION_FILE = "ensemble.json"
COMBINER_FILE = "combiner.onnx"
COMBINE_KINDS: tuple[str, ...] = ("vote", "soft_vote", "mean", "median", "meta", "samme", "additive")
#: Kinds that need each member's class probabilities (the others need labels or predictions).
NEEDS_PROBABILITIES: frozenset[str] = frozenset({"soft_vote"})


@dataclass(frozen=True)
class PinnedMember:
    """One member, pinned: ``name/version`` served by ``runtime`` with ``config``."""

    name: str
    version: str
    weight: float = 1.0
    runtime: str = "onnx"
    config: dict[str, Any] | None = None
    ref: str | None = None  # what the spec named ("iris@champion"), for people reading the card

    @property
    def target(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True)
class Combine:
    """How the members' answers become one (module docstring)."""

    kind: str
    bias: float = 0.0  # additive: the initial prediction (scikit-learn's init_)
    # meta: what of each member feeds the meta-learner: "probabilities" (classifiers) or
    # "predictions" (labels as class indices for classifiers; values for regressors)
    meta_inputs: str = "predictions"

    def __post_init__(self) -> None:
        if self.kind not in COMBINE_KINDS:
            raise ValueError(f"unknown combine kind {self.kind!r}; one of {', '.join(COMBINE_KINDS)}")


@dataclass(frozen=True)
class Policy:
    min_members: int | None = None  # None: every member must answer
    member_timeout_s: float | None = None  # None: serving.predict_timeout_s

    def quorum(self, n_members: int) -> int:
        return n_members if self.min_members is None else min(self.min_members, n_members)


@dataclass(frozen=True)
class EnsembleDefinition:
    name: str  # the ensemble's registered model name
    task: str  # classification | regression
    method: str  # voting | averaging | stacking | blending | bagging | boosting
    members: tuple[PinnedMember, ...]
    combine: Combine
    policy: Policy = field(default_factory=Policy)
    classes: list[Any] | None = None  # classifiers: the class labels, in probability-column order
    feature_names: list[str] | None = None
    n_features: int | None = None
    has_combiner: bool = False  # combiner.onnx exists (meta)

    @property
    def weights(self) -> list[float]:
        return [m.weight for m in self.members]

    @property
    def needs_probabilities(self) -> bool:
        return self.combine.kind in NEEDS_PROBABILITIES or (
            self.combine.kind == "meta" and self.combine.meta_inputs == "probabilities"
        )

    def member_key(self) -> tuple[tuple[str, str, str], ...]:
        """What decides whether a new ensemble version is needed: the pinned members (name, version,
        runtime), in order."""
        return tuple((m.name, m.version, m.runtime) for m in self.members)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True, default=_plain)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EnsembleDefinition:
        data = dict(data)
        data["members"] = tuple(PinnedMember(**m) for m in data["members"])
        data["combine"] = Combine(**data["combine"])
        data["policy"] = Policy(**(data.get("policy") or {}))
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> EnsembleDefinition:
        return cls.from_dict(json.loads(text))


def _plain(value: Any) -> Any:
    """numpy scalars and arrays (class labels from a fitted estimator) as JSON values of their
    own type: an int64 class stays a number, so a label read back compares equal."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serializable in an ensemble definition")


def combine_for(spec) -> Combine:
    """The combine rule of an :class:`app.ensembles.spec.EnsembleSpec` (boosting's and
    stacking's are completed by the job that trains them: biases, meta inputs)."""
    m = spec.method
    if m == "voting":
        return Combine("vote" if spec.voting == "hard" else "soft_vote")
    if m in ("averaging", "bagging"):
        if spec.task == "classification":
            return Combine("soft_vote")
        return Combine("median" if m == "averaging" and spec.averaging == "median" else "mean")
    if m in ("stacking", "blending"):
        inputs = spec.combiner.inputs if spec.task == "classification" else "predictions"
        return Combine("meta", meta_inputs=inputs)
    return Combine("samme" if spec.task == "classification" else "additive")
