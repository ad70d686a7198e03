"""A ``kind: ensemble`` job: stacking, blending, bagging or boosting, from spec to a registered
ensemble version.

1. load and split the dataset once (``app.training.data.prepare_data``, as a training job);
2. by method:

   * ``stacking``: the registered members are refit, a clone each, on K-1 folds of the
     training rows and predict the held-out fold (:func:`app.ensembles.learners.out_of_fold`);
     the meta-learner is fit on those out-of-fold predictions. A member is refit from its
     training job's spec (version tag ``matih.job_id`` -> the metadata store's job); at
     serving the pinned members themselves feed the meta-learner;
   * ``blending``: the meta-learner is fit on the pinned members' predictions of a split of
     the training rows (``combiner.holdout``); nothing is refit;
   * ``bagging``: ``n_estimators`` bootstrap replicas of ``base``, one Ray task each, trained in
     parallel; members of equal weight;
   * ``boosting``: scikit-learn's ``AdaBoostClassifier`` (SAMME) or ``GradientBoostingRegressor``,
     each learner a member with its weight;

3. members and the meta-learner as ONNX (parity-checked); trained members registered as versions
   of ``<name>-members``;
4. ``app.ensembles.registry.publish``: holdout scores of the ensemble and each member, the gates
   against the champion, the fused graph, one registration (idempotent by job id).
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from typing import Any

import numpy as np

from app.ensembles import learners
from app.ensembles.definition import Combine, EnsembleDefinition, PinnedMember, Policy, combine_for
from app.ensembles.spec import EnsembleSpec
from app.errors import InvalidInput, MatihError
from app.registry.mlflow_registry import TAG_FEATURES, TAG_FORMAT, TAG_JOB
from app.settings import Settings
from app.training.data import PreparedData, prepare_data
from app.training.pipeline import Reporter

log = logging.getLogger(__name__)


def prepare(spec: EnsembleSpec, settings: Settings) -> PreparedData:
    """The job's data, split once as a training job splits it (torch bagging: labels as indices)."""
    d = spec.dataset
    torch_base = spec.base is not None and spec.base.framework == "torch"
    return prepare_data(d.uri, d.target, d.features, d.split.test_size, d.split.seed, task=spec.task,
                        encode_labels=torch_base, settings=settings)


def definition(spec: EnsembleSpec, data: PreparedData, members: list[PinnedMember], combine: Combine,
               has_combiner: bool) -> EnsembleDefinition:
    return EnsembleDefinition(
        name=spec.name, task=spec.task, method=spec.method, members=tuple(members), combine=combine,
        policy=Policy(spec.policy.min_members, spec.policy.member_timeout_s),
        classes=list(data.classes) if spec.task == "classification" else None,
        feature_names=list(data.feature_names), n_features=data.n_features, has_combiner=has_combiner,
    )


# --- the meta-learner (stacking, blending) -------------------------------------------------------

def _estimator(path: str, hyperparameters: dict[str, Any], field: str, settings: Settings):
    """An unfitted estimator of the allow-list with ``hyperparameters`` (422 naming ``field``
    when they do not fit it)."""
    from app.training.sklearn_trainer import resolve_estimator

    cls = resolve_estimator(path, settings.jobs.allowed_estimators)
    try:
        est = cls(**hyperparameters)
        est.get_params()
    except TypeError as exc:
        raise InvalidInput(f"{field} do not fit {path}: {exc}", details={"field": field}) from None
    return est


def build_meta_learner(spec: EnsembleSpec, settings: Settings):
    """The combiner's estimator (allow-listed path of ``combiner.estimator``) with its hyperparameters."""
    return _estimator(spec.combiner.estimator_path(spec.task), spec.combiner.hyperparameters,
                      "combiner.hyperparameters", settings)


def fit_meta_learner(spec: EnsembleSpec, settings: Settings, meta_X: np.ndarray, y: np.ndarray) -> tuple[bytes, float]:
    """Fit the meta-learner on the members' outputs (laid out by ``combine.meta_features``) and
    convert it: (ONNX bytes, parity on those rows)."""
    est = build_meta_learner(spec, settings)
    meta_X = np.asarray(meta_X, dtype=np.float32)
    try:
        est.fit(meta_X, y)
    except ValueError as exc:
        raise InvalidInput(f"the meta-learner's fit failed: {exc}", details={"field": "combiner"}) from None
    return learners.convert(est, meta_X, meta_X, spec.task == "classification",
                            settings.jobs.onnx_parity_tolerance, "the meta-learner")


def _pin(client, settings: Settings, spec: EnsembleSpec) -> list[PinnedMember]:
    """The spec's members resolved to versions and checked to share task, inputs and classes
    (the registry helper's ``pin_members``)."""
    from app.ensembles.registry import pin_members

    return list(pin_members(client, settings, spec))


def _member_onnx(client, spec: EnsembleSpec, index: int, member: PinnedMember) -> tuple[bytes, dict[str, str]]:
    """(ONNX bytes, tags) of a pinned member. A meta-learner is fit on members' outputs computed
    here, so a member must be an ONNX version (a 422 naming it otherwise)."""
    import mlflow.onnx

    tags = dict(client.get_model_version(member.name, member.version).tags or {})
    fmt = tags.get(TAG_FORMAT, "onnx")
    if fmt != "onnx":
        raise InvalidInput(f"member {member.ref or member.target} is a {fmt} model; a {spec.method} job computes its "
                           "members' outputs with ONNX Runtime, so each member must be an ONNX version",
                           details={"field": f"members[{index}].model"})
    proto = mlflow.onnx.load_model(f"models:/{member.name}/{member.version}")
    return proto.SerializeToString(), tags


def _check_features(spec: EnsembleSpec, index: int, member: PinnedMember, tags: dict[str, str],
                    data: PreparedData) -> None:
    features = json.loads(tags[TAG_FEATURES]) if TAG_FEATURES in tags else None
    if features is not None and list(features) != list(data.feature_names):
        raise InvalidInput(f"member {member.ref or member.target} takes features {features}; the dataset gives "
                           f"{data.feature_names}", details={"field": f"members[{index}].model"})


def _answer(pred: np.ndarray, proba: np.ndarray | None) -> dict[str, Any]:
    """A member's outputs in the shape serving's runtimes answer (what ``combine`` reads)."""
    out: dict[str, Any] = {"predictions": np.asarray(pred).reshape(-1)}
    if proba is not None:
        out["probabilities"] = np.asarray(proba)
    return out


def member_outputs(models: list[bytes], X: np.ndarray) -> list[dict[str, Any]]:
    """Each ONNX member's answer on X: {"predictions", "probabilities"?}."""
    from app.training.validation import onnx_outputs

    return [_answer(*onnx_outputs(m, X)) for m in models]


def _native_outputs(est, X: np.ndarray, is_classifier: bool) -> dict[str, Any]:
    """A refit clone's answer in the shape ONNX members give theirs."""
    if is_classifier:
        proba = np.asarray(est.predict_proba(X)) if hasattr(est, "predict_proba") else None
        return _answer(np.asarray(est.predict(X)), proba)
    return _answer(np.asarray(est.predict(X), dtype=np.float32), None)


def refit_estimators(spec: EnsembleSpec, settings: Settings, members: list[PinnedMember],
                     tags: list[dict[str, str]], store=None) -> list[Any]:
    """For stacking, an unfitted clone of each member: its training job's estimator with the
    job's hyperparameters (and the tuned best_config). A member no job trained (uploaded), a
    torch member, or one whose job is gone cannot be refit: a 422 naming it, pointing at
    blending (which refits nothing)."""
    from app.errors import NotFound
    from app.store import MetadataStore
    from app.training.sklearn_trainer import build_estimator
    from app.training.spec import TrainingJobSpec

    store = store or MetadataStore.from_settings(settings)
    out = []
    for i, (m, t) in enumerate(zip(members, tags)):
        who = m.ref or m.target

        def refuse(why: str) -> InvalidInput:
            return InvalidInput(f"member {who} cannot be refit on the stacking folds: {why}; use blending (a "
                                "meta-learner on a holdout split, nothing refit)", details={"field": f"members[{i}].model"})

        job_id = t.get(TAG_JOB)
        if not job_id:
            raise refuse("no training job made it (uploaded)")
        try:
            job = store.get_job(job_id)
        except NotFound:
            raise refuse(f"its training job {job_id} is not in the metadata store") from None
        if job.get("kind") != "training":
            raise refuse(f"it was made by a {job.get('kind')} job, not a training job")
        tspec = TrainingJobSpec.model_validate(job["spec"])
        if tspec.framework != "sklearn":
            raise refuse(f"it is a {tspec.framework} model")
        hparams = {**tspec.hyperparameters, **((job.get("result") or {}).get("best_config") or {})}
        out.append(build_estimator(tspec, settings, hparams))
    return out


def stacking_fit_predict(spec: EnsembleSpec, defn: EnsembleDefinition, estimators: list[Any], X: np.ndarray,
                         y: np.ndarray, meta_features) -> learners.FitPredict:
    """The fit_predict of :func:`learners.out_of_fold` for stacking: a clone of every member
    fit on the fold's other rows, their outputs on the held-out rows laid out by
    ``meta_features(defn, outputs)``."""
    from sklearn.base import clone

    is_clf = spec.task == "classification"

    def fit_predict(fit_rows: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        outputs = []
        for i, est in enumerate(estimators):
            member = clone(est)
            try:
                member.fit(X[fit_rows], y[fit_rows])
            except ValueError as exc:
                raise InvalidInput(f"member {defn.members[i].target}: refit on a fold failed: {exc}",
                                   details={"field": f"members[{i}].model"}) from None
            outputs.append(_native_outputs(member, X[held_out], is_clf))
        return meta_features(defn, outputs)

    return fit_predict


def _stacking(spec: EnsembleSpec, settings: Settings, client, data: PreparedData, report: Reporter, store=None):
    from app.ensembles.combine import meta_features

    pinned = _pin(client, settings, spec)
    models, tags = zip(*(_member_onnx(client, spec, i, m) for i, m in enumerate(pinned)))
    for i, m in enumerate(pinned):
        _check_features(spec, i, m, tags[i], data)
    defn = definition(spec, data, pinned, combine_for(spec), has_combiner=True)
    estimators = refit_estimators(spec, settings, pinned, list(tags), store)
    k = spec.combiner.folds
    report({"stage": "out_of_fold", "folds": k, "members": len(pinned)},
           f"stacking: refitting {len(pinned)} members on {k} folds of {len(data.X_train)} training rows")
    fit_predict = stacking_fit_predict(spec, defn, estimators, data.X_train, data.y_train, meta_features)
    oof, folds = learners.out_of_fold(fit_predict, data.X_train, data.y_train, k, spec.seed,
                                      stratified=spec.task == "classification")
    learners.check_no_leakage(folds, len(data.X_train))
    report({"stage": "meta_learner", "rows": len(oof), "meta_features": int(oof.shape[1])},
           f"fitting {spec.combiner.estimator} on {oof.shape[1]} out-of-fold meta-features")
    combiner, diff = fit_meta_learner(spec, settings, oof, data.y_train)
    extra = {"folds": folds, "meta_features": int(oof.shape[1]), "combiner_onnx_max_abs_diff": diff}
    return defn, list(models), combiner, extra


def _blending(spec: EnsembleSpec, settings: Settings, client, data: PreparedData, report: Reporter):
    from sklearn.model_selection import train_test_split

    from app.ensembles.combine import meta_features

    pinned = _pin(client, settings, spec)
    models, tags = zip(*(_member_onnx(client, spec, i, m) for i, m in enumerate(pinned)))
    for i, m in enumerate(pinned):
        _check_features(spec, i, m, tags[i], data)
    defn = definition(spec, data, pinned, combine_for(spec), has_combiner=True)
    rows = np.arange(len(data.X_train))
    strat = data.y_train if spec.task == "classification" else None
    _, blend = train_test_split(rows, test_size=spec.combiner.holdout, random_state=spec.seed, stratify=strat)
    report({"stage": "meta_learner", "rows": len(blend)},
           f"blending: fitting {spec.combiner.estimator} on the members' predictions of {len(blend)} rows")
    meta = meta_features(defn, member_outputs(list(models), data.X_train[blend]))
    combiner, diff = fit_meta_learner(spec, settings, meta, data.y_train[blend])
    extra = {"blend_rows": len(blend), "blend_rows_sha256": learners.rows_sha256(blend),
             "meta_features": int(np.asarray(meta).shape[1]), "combiner_onnx_max_abs_diff": diff}
    return defn, list(models), combiner, extra


# --- members trained by the job (bagging, boosting) ----------------------------------------------

def _base_estimator(spec: EnsembleSpec, settings: Settings):
    return _estimator(spec.base.estimator, spec.base.hyperparameters, "base.hyperparameters", settings)


def train_bagging(spec: EnsembleSpec, settings: Settings, data: PreparedData, *,
                  parallel: bool = True) -> list[learners.Replica]:
    """``n_estimators`` bootstrap replicas of ``base``. ``parallel``: one Ray task each,
    reserving ``resources.cpus_per_member`` (Ray must be initialised: a job runs as a Ray Job);
    otherwise one after the other in this process (the benchmark's baseline, and a job run
    without Ray, e.g. the in-process scheduler of the unit tests)."""
    is_clf = spec.task == "classification"
    samples = learners.bootstrap_indices(len(data.X_train), spec.n_estimators, spec.seed,
                                         data.y_train if is_clf else None)
    tol = settings.jobs.onnx_parity_tolerance
    torch_base = spec.base.framework == "torch"
    if torch_base:
        model_spec = spec.base.model.model_dump(mode="json")
        args = [(i, model_spec, spec.base.hyperparameters, data, rows, spec.seed + i) for i, rows in enumerate(samples)]
        fn = learners.fit_torch_replica
    else:
        est = _base_estimator(spec, settings)
        args = [(i, est, data.X_train, data.y_train, rows, is_clf, tol, data.X_holdout) for i, rows in enumerate(samples)]
        fn = learners.fit_replica
    if not parallel:
        return [fn(*a) for a in args]
    import ray

    task = ray.remote(fn).options(num_cpus=spec.resources.cpus_per_member, max_retries=1)
    if torch_base:
        data_ref = ray.put(data)
        refs = [task.remote(i, m, h, data_ref, rows, s) for i, m, h, _, rows, s in args]
    else:
        # the arrays are shipped once, not once per task
        X_ref, y_ref, hold_ref = ray.put(data.X_train), ray.put(data.y_train), ray.put(data.X_holdout)
        refs = [task.remote(i, e, X_ref, y_ref, rows, c, t, hold_ref) for i, e, _, _, rows, c, t, _ in args]
    try:
        return list(ray.get(refs))
    except ray.exceptions.RayTaskError as exc:  # a 422 or a parity failure inside a task: the job fails with it
        if isinstance(getattr(exc, "cause", None), MatihError):
            raise exc.cause from None
        raise


def _bagging(spec: EnsembleSpec, settings: Settings, client, data: PreparedData, report: Reporter, job_id: str):
    import ray

    from app.ensembles.registry import register_members

    parallel = ray.is_initialized()
    report({"stage": "bagging", "members": spec.n_estimators, "parallel": parallel},
           f"bagging: {spec.n_estimators} bootstrap replicas of "
           f"{spec.base.estimator or spec.base.model.kind}, "
           + (f"one Ray task each ({spec.resources.cpus_per_member:g} CPU)" if parallel
              else "one after the other (Ray is not initialised in this process)"))
    replicas = train_bagging(spec, settings, data, parallel=parallel)
    models = [r.onnx for r in replicas]
    report({"stage": "registering_members"}, f"registering {len(models)} members as {spec.name}-members")
    members = register_members(client, settings, spec.name, models, task=spec.task, classes=data.classes or None,
                               feature_names=data.feature_names, job_id=job_id, data=data)
    defn = definition(spec, data, [replace(m, weight=1.0) for m in members], combine_for(spec), has_combiner=False)
    extra = {"parallel": parallel, "cpus_per_member": spec.resources.cpus_per_member,
             "tasks": [{"member": r.index, "start": r.start, "end": r.end, "pid": r.pid, "unique_rows": r.unique_rows,
                        "onnx_max_abs_diff": r.parity} for r in replicas]}
    return defn, models, None, extra


def train_boosting(spec: EnsembleSpec, settings: Settings, data: PreparedData):
    """(booster, member ONNX bytes, weights, Combine) of a boosting spec."""
    tol = settings.jobs.onnx_parity_tolerance
    if spec.task == "classification":
        booster, learned, weights = learners.adaboost(_base_estimator(spec, settings), data.X_train, data.y_train,
                                                      spec.n_estimators, spec.learning_rate, spec.seed)
        combine = Combine("samme")
    else:
        booster, learned, bias = learners.gradient_boosting(spec.base.estimator, spec.base.hyperparameters,
                                                            data.X_train, data.y_train, spec.n_estimators,
                                                            spec.learning_rate, spec.seed)
        weights = [float(spec.learning_rate)] * len(learned)
        combine = Combine("additive", bias=bias)
    is_clf = spec.task == "classification"
    models = [learners.convert(m, data.X_train, data.X_holdout, is_clf, tol, f"boosting member {i}")[0]
              for i, m in enumerate(learned)]
    return booster, models, weights, combine


def _boosting(spec: EnsembleSpec, settings: Settings, client, data: PreparedData, report: Reporter, job_id: str):
    from app.ensembles.registry import register_members

    algo = "AdaBoost.SAMME" if spec.task == "classification" else "gradient boosting"
    report({"stage": "boosting", "rounds": spec.n_estimators}, f"{algo}: {spec.n_estimators} rounds of {spec.base.estimator}")
    booster, models, weights, combine = train_boosting(spec, settings, data)
    report({"stage": "registering_members"}, f"registering {len(models)} learners as {spec.name}-members")
    members = register_members(client, settings, spec.name, models, task=spec.task, classes=data.classes or None,
                               feature_names=data.feature_names, job_id=job_id, data=data)
    members = [replace(m, weight=w) for m, w in zip(members, weights)]
    defn = definition(spec, data, members, combine, has_combiner=False)
    extra = {"weights": weights, "rounds_kept": len(models), "algorithm": algo}
    if combine.kind == "additive":
        extra["bias"] = combine.bias
    return defn, models, None, extra


def run_ensemble_job(spec: EnsembleSpec, settings: Settings, job_id: str, report: Reporter, *,
                     store=None) -> dict[str, Any]:
    """Train the ensemble of ``spec`` and publish it (module docstring). ``report(progress,
    line)`` as a training job's. ``store``: the metadata store (stacking reads its members'
    training jobs; the job's owner is the registration's actor); default from the settings."""
    import mlflow
    from mlflow import MlflowClient

    from app.ensembles.registry import publish
    from app.storage.s3 import configure_s3_env
    from app.store import MetadataStore

    if not spec.trained:
        raise InvalidInput(f"method {spec.method!r} is not trained by a job; POST /v1/ensembles registers it",
                           details={"field": "method"})
    configure_s3_env(settings)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    store = store or MetadataStore.from_settings(settings)
    try:
        actor = store.get_job(job_id).get("created_by") or "system"
    except Exception:  # a job run outside the store (a test, a script): the registration says who by "system"
        actor = "system"
    report({"stage": "loading", "dataset": spec.dataset.uri}, f"loading {spec.dataset.uri}")
    data = prepare(spec, settings)
    if spec.method == "stacking":
        defn, models, combiner, extra = _stacking(spec, settings, client, data, report, store)
    elif spec.method == "blending":
        defn, models, combiner, extra = _blending(spec, settings, client, data, report)
    elif spec.method == "bagging":
        defn, models, combiner, extra = _bagging(spec, settings, client, data, report, job_id)
    else:
        defn, models, combiner, extra = _boosting(spec, settings, client, data, report, job_id)
    report({"stage": "publishing", "members": len(defn.members)},
           f"scoring and registering {spec.name} ({spec.method}, {len(defn.members)} members)")
    result = publish(client, settings, defn, member_models=models, combiner=combiner, data=data,
                     validation=spec.validation, fuse=spec.fuse, job_id=job_id, actor=actor, extra_result=extra)
    out = {**result, "method": spec.method, **{k: v for k, v in extra.items() if k not in result}}
    report({"stage": "done"}, f"{spec.name}: {json.dumps({k: out.get(k) for k in ('model_version', 'aliases')}, default=str)}")
    return out
