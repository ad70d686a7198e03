"""What ``POST /v1/ensembles`` takes (and a ``kind: ensemble`` job runs): one pydantic model,
every field documented where it is declared.

Six methods, two families:

* defined from registered members, nothing trained: ``voting`` (hard or soft) and
  ``averaging`` (mean, median or weighted mean); creating one registers version 1 at once;
* trained by a job (``kind: ensemble`` through the JobScheduler): ``stacking`` and ``blending``
  (a meta-learner over registered members), ``bagging`` and ``boosting`` (members trained by
  the job itself from ``base``).

Checks that need only the spec live here as validators (a bad spec is a 422 naming the field);
checks that need the registry (members share task, inputs and classes) live in
``app.ensembles.registry``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from app.names import check_name
from app.training.spec import DatasetSpec, TorchModelSpec, ValidationSpec

Method = Literal["voting", "averaging", "stacking", "blending", "bagging", "boosting"]
METHODS: tuple[str, ...] = ("voting", "averaging", "stacking", "blending", "bagging", "boosting")
#: Methods whose ensembles a job trains; the others are registered when they are created.
TRAINED_METHODS: frozenset[str] = frozenset({"stacking", "blending", "bagging", "boosting"})
#: Methods over registered members (``members``); bagging and boosting train their own (``base``).
MEMBER_METHODS: frozenset[str] = frozenset({"voting", "averaging", "stacking", "blending"})
MAX_MEMBERS = 32
#: Short names of meta-learners (stacking, blending) -> the estimator's import path. The path
#: must also be on ``settings.jobs.allowed_estimators``.
META_LEARNERS: dict[str, dict[str, str]] = {
    "logistic_regression": {"classification": "sklearn.linear_model.LogisticRegression"},
    "ridge": {"regression": "sklearn.linear_model.Ridge"},
    "gradient_boosting": {
        "classification": "sklearn.ensemble.GradientBoostingClassifier",
        "regression": "sklearn.ensemble.GradientBoostingRegressor",
    },
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MemberSpec(_Strict):
    """A registered model version taking part in the ensemble."""

    model: str = Field(
        ..., description="The member: 'name@alias' or 'name/version' (also models:/ URIs). Pinned to the version it "
        "resolves to when the ensemble version is made; a later change of that alias makes a new ensemble version "
        "only when the ensemble is created again (POST /v1/ensembles with the same name).",
        examples=["iris-logreg@champion", "iris-forest/3"],
    )
    weight: float | None = Field(
        None, gt=0, description="Weight in soft voting, weighted averaging and weighted hard voting; default 1."
    )
    runtime: str = Field(
        "onnx", description="Runtime serving this member (onnx, native, triton), as for an endpoint."
    )
    config: dict[str, Any] | None = Field(
        None, description="The member's runtime config, as an endpoint's `config` (e.g. a triton member's url)."
    )


class CombinerSpec(_Strict):
    """The meta-learner of stacking and blending: fit on the members' predictions, stored as ONNX."""

    estimator: Literal["logistic_regression", "ridge", "gradient_boosting"] = Field(
        "logistic_regression",
        description="logistic_regression (classification), ridge (regression), or gradient_boosting "
        "(GradientBoostingClassifier / Regressor); each must be on settings.jobs.allowed_estimators.",
    )
    hyperparameters: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of the estimator.")
    folds: int = Field(5, ge=2, le=20, description="stacking: K of the K-fold out-of-fold member predictions.")
    holdout: float = Field(
        0.3, gt=0, lt=1, description="blending: share of the training rows the meta-learner is fit on (the members "
        "never see them: blending refits nothing, so members should not have been trained on them either).",
    )
    inputs: Literal["probabilities", "predictions"] = Field(
        "probabilities", description="Classification: what of each member feeds the meta-learner (class "
        "probabilities, or predicted labels as class indices). Regression always uses predictions.",
    )

    def estimator_path(self, task: str) -> str:
        paths = META_LEARNERS[self.estimator]
        if task not in paths:
            raise ValueError(f"combiner.estimator {self.estimator!r} is not a {task} estimator")
        return paths[task]


class BaseLearnerSpec(_Strict):
    """What bagging replicates and boosting reweights: an estimator of the allow-list, or (bagging
    only) a torch model of the built-in zoo."""

    framework: Literal["sklearn", "torch"] = "sklearn"
    estimator: str | None = Field(
        None, description="sklearn: import path from settings.jobs.allowed_estimators.",
        examples=["sklearn.tree.DecisionTreeClassifier"],
    )
    model: TorchModelSpec | None = Field(None, description="torch (bagging only): the zoo model.")
    hyperparameters: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments of the estimator (torch: epochs, lr, batch_size...).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> BaseLearnerSpec:
        if self.framework == "sklearn":
            if not self.estimator:
                raise ValueError("base.framework 'sklearn' needs base.estimator (an import path from the allow-list)")
            if self.model is not None:
                raise ValueError("base.model is for framework 'torch'")
        else:
            if self.estimator:
                raise ValueError("base.estimator is for framework 'sklearn'; torch names base.model")
            if self.model is None:
                self.model = TorchModelSpec()
        return self


class PolicySpec(_Strict):
    """What serving does when a member is slow or down."""

    min_members: int | None = Field(
        None, ge=1, description="Members that must answer (the quorum); default: all. With fewer answers than "
        "this the request fails with 503; with at least this many but not all, the answer comes from those that "
        "answered, marked `degraded: true`. Meta-learner ensembles (stacking, blending) need every member.",
    )
    member_timeout_s: float | None = Field(
        None, gt=0, le=600, description="How long one member may take; default: serving.predict_timeout_s. A member "
        "past it counts as not answering.",
    )


class EnsembleResources(_Strict):
    cpus_per_member: float = Field(
        0.5, gt=0, le=64, description="bagging: CPUs each member's training task reserves (members train in parallel).",
    )


class EnsembleSpec(_Strict):
    """An ensemble: ``POST /v1/ensembles``, or the spec of a ``kind: ensemble`` job."""

    name: str = Field(..., description="Registered model name of the ensemble.", examples=["iris-ens"])
    task: Literal["classification", "regression"] = Field(..., description="What every member predicts.")
    method: Method = Field(..., description="How members are combined (module docstring).")
    members: list[MemberSpec] = Field(
        default_factory=list, max_length=MAX_MEMBERS,
        description="voting, averaging, stacking, blending: the registered members (at least 2). bagging and "
        "boosting train their own members and take none.",
    )
    voting: Literal["hard", "soft"] = Field(
        "soft", description="voting: hard = the (weighted) majority of labels, ties broken by the first member; "
        "soft = the (weighted) mean of class probabilities.",
    )
    averaging: Literal["mean", "median", "weighted"] = Field(
        "mean", description="averaging of regressors: mean, median, or weighted mean (member weights). "
        "Classifiers: the weighted mean of probabilities, whatever this says.",
    )
    combiner: CombinerSpec | None = Field(
        None, description="stacking, blending: the meta-learner (default logistic_regression for classification, "
        "ridge for regression).",
    )
    base: BaseLearnerSpec | None = Field(None, description="bagging, boosting: the learner each member is.")
    n_estimators: int | None = Field(
        None, ge=2, le=MAX_MEMBERS, description="bagging: replicas (default 8); boosting: rounds (default 10)."
    )
    learning_rate: float = Field(
        1.0, gt=0, le=10, description="boosting: shrinks each learner's weight (AdaBoost) or step (gradient boosting)."
    )
    seed: int = Field(0, description="Seed of bootstrap samples, folds and learners.")
    dataset: DatasetSpec | None = Field(
        None, description="Trained methods: the data members and the meta-learner are fit and validated on. "
        "voting, averaging: optional; when given, the ensemble and each member are scored on its holdout (the "
        "model card shows whether the ensemble beats its best member) and the gates apply.",
    )
    policy: PolicySpec = Field(default_factory=PolicySpec, description="Member timeout and quorum when serving.")
    validation: ValidationSpec = Field(
        default_factory=ValidationSpec, description="Gates against the champion, as for a training job; the first "
        "version becomes 'champion', later passing ones validation.alias_on_pass.",
    )
    fuse: bool = Field(
        True, description="When every member and the combiner are ONNX, also store one fused ONNX graph "
        "(checked against the fan-out on the holdout) that an endpoint can serve with config.ensemble 'fused'.",
    )
    resources: EnsembleResources = Field(default_factory=EnsembleResources)
    priority: int = Field(0, ge=-100, le=100, description="Job priority (trained methods).")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "name")

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleSpec:
        m = self.method
        if m in MEMBER_METHODS:
            if len(self.members) < 2:
                raise ValueError(f"method {m!r} needs at least 2 members")
            if self.base is not None:
                raise ValueError(f"base is for bagging and boosting; {m!r} combines registered members")
        else:
            if self.members:
                raise ValueError(f"method {m!r} trains its own members from base; members must be empty")
            if self.base is None:
                raise ValueError(f"method {m!r} needs base (the learner each member is)")
            if m == "boosting" and self.base.framework != "sklearn":
                raise ValueError("boosting reweights rows for scikit-learn learners; base.framework must be 'sklearn'")
            if self.n_estimators is None:
                self.n_estimators = 8 if m == "bagging" else 10
        if m in ("stacking", "blending"):
            if self.combiner is None:
                self.combiner = CombinerSpec(
                    estimator="logistic_regression" if self.task == "classification" else "ridge"
                )
            self.combiner.estimator_path(self.task)  # a regression meta-learner for a classifier fails here
            if self.policy.min_members is not None and self.policy.min_members != len(self.members):
                raise ValueError("policy.min_members: a meta-learner needs every member's answer; leave it unset")
        elif self.combiner is not None:
            raise ValueError(f"combiner is for stacking and blending, not {m!r}")
        if m in TRAINED_METHODS and self.dataset is None:
            raise ValueError(f"method {m!r} is trained: dataset is required")
        if self.policy.min_members is not None and m in MEMBER_METHODS and self.policy.min_members > len(self.members):
            raise ValueError(f"policy.min_members ({self.policy.min_members}) exceeds the {len(self.members)} members")
        if self.averaging == "weighted" and m == "averaging" and not any(x.weight for x in self.members):
            raise ValueError("averaging 'weighted' needs a weight on at least one member")
        return self

    @property
    def trained(self) -> bool:
        return self.method in TRAINED_METHODS


def check_ensemble_spec(spec: EnsembleSpec, settings) -> EnsembleSpec:
    """Checks that need the settings: estimators on the allow-list, the dataset path confined
    to the data roots (made canonical). InvalidInput naming the field."""
    from app.errors import InvalidInput
    from app.storage.paths import check_job_location

    allowed = set(settings.jobs.allowed_estimators)
    paths = []
    if spec.combiner is not None:
        paths.append(("combiner.estimator", spec.combiner.estimator_path(spec.task)))
    if spec.base is not None and spec.base.framework == "sklearn":
        paths.append(("base.estimator", spec.base.estimator))
    for field, path in paths:
        if path not in allowed:
            raise InvalidInput(
                f"{field}: {path} is not on settings.jobs.allowed_estimators", details={"field": field}
            )
    if spec.dataset is not None and not spec.dataset.uri.startswith("builtin://"):
        uri = check_job_location(spec.dataset.uri, settings, "dataset.uri")
        spec = spec.model_copy(update={"dataset": spec.dataset.model_copy(update={"uri": uri})})
    return spec
