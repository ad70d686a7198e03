"""A training job from spec to registered version, whatever the framework:

1. load and split the data once (``app.training.data``);
2. with a ``tune`` block, run a Ray Tune search (every trial an MLflow child run of the job's
   run) and take the best trial's hyperparameters;
3. fit: scikit-learn in this process, torch with Ray Train (single, DDP, FSDP or pipeline
   stages, checkpointed, surviving worker failures);
4. convert to ONNX and check parity with the native model on the holdout;
5. score the ONNX model and the current champion on the same holdout, apply the gates;
6. register a passing model with one ``create_model_version`` carrying every ``matih.*`` tag
   (the validation report among them: its model card shows it); the first version becomes
   ``champion``, later ones the ``validation.alias_on_pass`` alias (``challenger``).

Idempotent by job id: a re-run of a job whose version is registered returns that version
(and sets its alias if the earlier attempt stopped before); see :func:`register_version`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from app.errors import InvalidInput, MatihError, ModelError
from app.registry.lineage import code_version
from app.registry.mlflow_registry import (
    TAG_CLASSES,
    TAG_CODE_VERSION,
    TAG_DATASET_SHA256,
    TAG_FEATURE_SERVICE,
    TAG_DATASET_URI,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_JOB,
    TAG_PARITY,
    TAG_TASK,
    TAG_VALIDATION,
    TAG_VALIDATION_REPORT,
    ensure_experiment,
)
from app.settings import Settings
from app.storage.s3 import configure_s3_env
from app.training.data import PreparedData, prepare_data
from app.training.spec import TrainingJobSpec
from app.training.validation import ValidationReport, check_gates, score_onnx

log = logging.getLogger(__name__)
Reporter = Callable[[dict[str, Any], str | None], None]


class ValidationFailed(MatihError):
    """The trained model did not pass its gates: the job fails and nothing is registered; the
    job's result keeps the metrics and the gate outcomes."""

    code = "validation_failed"

    def __init__(self, message: str, *, result: dict[str, Any] | None = None, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.details.setdefault("result", result or {})


def run_dir(spec: TrainingJobSpec, settings: Settings, job_id: str) -> str:
    """Where Ray Train keeps this job's checkpoints (``<storage>/<job id>``)."""
    base = spec.checkpoint.storage_path or settings.train_storage_path()
    return base.rstrip("/") + "/" + job_id


def _labels(data: PreparedData, y: np.ndarray) -> np.ndarray:
    """Original class labels of y (torch jobs hold indices 0..k-1)."""
    if data.task == "classification" and data.classes and np.issubdtype(np.asarray(y).dtype, np.integer) \
            and list(data.classes) != list(range(len(data.classes))):
        return np.asarray(data.classes, dtype=object)[np.asarray(y)]
    return np.asarray(y)


def job_version(client, name: str, job_id: str):
    """The version of ``name`` that job ``job_id`` registered (tag ``matih.job_id``), or None:
    what makes a job's registration repeatable (training and ensemble jobs alike)."""
    from mlflow.exceptions import MlflowException

    try:
        for mv in client.search_model_versions(f"name = '{name}'"):
            if (mv.tags or {}).get(TAG_JOB) == job_id:
                return mv
    except MlflowException:
        return None
    return None


def _champion(client, spec: TrainingJobSpec, data: PreparedData, y_true: np.ndarray) -> dict[str, Any] | None:
    """The version behind ``validation.compare_with`` scored on this job's holdout, or None
    when there is none. A champion that cannot be scored here (another format, other
    features or task) is returned without metrics and a note saying why."""
    import mlflow.onnx
    from mlflow.exceptions import MlflowException

    name, alias = spec.register_as, spec.validation.compare_with
    if not name:
        return None
    try:
        mv = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    tags = mv.tags or {}
    out: dict[str, Any] = {"version": str(mv.version), "alias": alias, "metrics": None}
    if tags.get(TAG_FORMAT, "onnx") != "onnx":
        out["note"] = f"the {alias} is a {tags.get(TAG_FORMAT)} model; only ONNX versions are scored here"
        return out
    features = json.loads(tags[TAG_FEATURES]) if TAG_FEATURES in tags else None
    if features is not None and features != data.feature_names:
        out["note"] = f"the {alias} was trained on other features ({features}); not comparable"
        return out
    if tags.get(TAG_TASK) and tags[TAG_TASK] != data.task:
        out["note"] = f"the {alias} is a {tags[TAG_TASK]} model; this job is {data.task}"
        return out
    try:
        proto = mlflow.onnx.load_model(f"models:/{name}/{mv.version}")
        out["metrics"] = score_onnx(proto.SerializeToString(), data.X_holdout, y_true, data.task, data.classes)
    except Exception as exc:  # the champion cannot be loaded: the gates that need it fail, saying so
        out["note"] = f"the {alias} could not be scored: {type(exc).__name__}: {exc}"
    return out


def _fit(spec: TrainingJobSpec, data: PreparedData, settings: Settings, job_id: str, hparams: dict[str, Any],
         report: Reporter) -> tuple[Any, float, float, dict[str, Any]]:
    """Train; returns (onnx ModelProto, max |onnx - native|, label agreement, extra result fields)."""
    if spec.framework == "sklearn":
        from app.onnx.sklearn_export import onnx_parity, to_onnx
        from app.training.sklearn_trainer import build_estimator

        est = build_estimator(spec, settings, hparams)
        report({"stage": "fitting", "rows_train": len(data.X_train), "rows_holdout": len(data.X_holdout)},
               f"fitting {spec.estimator}")
        try:
            est.fit(data.X_train, data.y_train)
        except ValueError as exc:
            raise InvalidInput(f"fit failed: {exc}", details={"field": "hyperparameters"}) from None
        is_clf = data.task == "classification"
        onnx_model = to_onnx(est, data.X_train, is_clf)
        diff, agreement = onnx_parity(onnx_model, est, data.X_holdout, is_clf)
        scale = 1.0 if is_clf else max(1.0, float(np.max(np.abs(est.predict(data.X_holdout)))))
        return onnx_model, diff, agreement, {"parity_scale": scale}
    from app.onnx.torch_export import export_onnx
    from app.training.torch_train import fit_torch

    report({"stage": "training", "strategy": spec.strategy, "workers": spec.resources.num_workers},
           f"training {spec.model.kind} with strategy {spec.strategy} on {spec.resources.num_workers} worker(s)")
    res = fit_torch(spec, data, settings, job_id, hparams)
    onnx_model, diff = export_onnx(res.model, data)
    scale = 1.0 if data.task == "classification" else max(1.0, float(np.max(np.abs(data.y_holdout))))
    extra = {"parity_scale": scale, "best_checkpoint": res.best_checkpoint, "storage_dir": res.storage_dir,
             "history": res.history[-50:], "train_metrics": res.metrics}
    return onnx_model, diff, 1.0, extra


def run_training(spec: TrainingJobSpec, settings: Settings, job_id: str, report: Reporter) -> dict[str, Any]:
    import mlflow
    import mlflow.onnx
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    configure_s3_env(settings)  # artifacts may go to s3:// (MLflow reads the endpoint from the environment)
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    mlflow.set_registry_uri(settings.mlflow_tracking_uri)
    client = MlflowClient(settings.mlflow_tracking_uri, settings.mlflow_tracking_uri)
    if spec.register_as:
        prior = job_version(client, spec.register_as, job_id)
        if prior is not None:  # a retry after the version was registered: do not register twice
            alias = ensure_alias(client, spec.register_as, str(prior.version), spec.validation.alias_on_pass)
            report({"stage": "done"}, f"version {prior.version} was registered by an earlier attempt")
            run = client.get_run(prior.run_id)
            return {"run_id": prior.run_id, "model_name": prior.name, "model_version": str(prior.version),
                    "aliases": [alias],
                    "metrics": {k[len("holdout_"):]: v for k, v in run.data.metrics.items() if k.startswith("holdout_")},
                    "onnx_max_abs_diff": run.data.metrics.get("onnx_max_abs_diff")}

    d = spec.dataset
    data = prepare_data(d.uri, d.target, d.features, d.split.test_size, d.split.seed,
                        task=spec.task, encode_labels=spec.framework == "torch", settings=settings)
    y_true = _labels(data, data.y_holdout)
    exp_id = ensure_experiment(client, settings)
    hparams = dict(spec.hyperparameters)
    result: dict[str, Any] = {"task": data.task}
    with mlflow.start_run(experiment_id=exp_id, run_name=spec.name, tags={TAG_JOB: job_id}) as run:
        result["run_id"] = run.info.run_id
        what = {"estimator": spec.estimator} if spec.framework == "sklearn" else {"model": spec.model.kind}
        mlflow.log_params({"framework": spec.framework, "strategy": spec.strategy, **what, "dataset": d.uri,
                           "rows_train": len(data.X_train), "rows_holdout": len(data.X_holdout),
                           "num_workers": spec.resources.num_workers})
        if spec.tune is not None:
            from app.training.tune import run_search, sklearn_trial_fn, torch_trial_fn, trials_total

            total = trials_total(spec.tune)
            report({"stage": "tuning", "trials_total": total}, f"Ray Tune: {total} trials")
            trial_fn = sklearn_trial_fn(spec, data, settings) if spec.framework == "sklearn" else \
                torch_trial_fn(spec, data, settings)
            outcome = run_search(spec, settings, job_id, run.info.run_id, trial_fn, run_dir(spec, settings, job_id))
            hparams.update(outcome.best_config)
            result.update({"trials": outcome.trials, "best_config": outcome.best_config,
                           "best_trial_metrics": outcome.best_metrics})
            report({"stage": "tuned", "trials": outcome.trials, "best_config": outcome.best_config},
                   f"best trial: {json.dumps(outcome.best_config, default=str)} -> {json.dumps(outcome.best_metrics)}")
        mlflow.log_params({k: str(v) for k, v in hparams.items()})  # the hyperparameters by their own names

        onnx_model, diff, agreement, extra = _fit(spec, data, settings, job_id, hparams, report)
        result.update({k: v for k, v in extra.items() if k != "parity_scale"})
        report({"stage": "parity", "onnx_max_abs_diff": diff}, f"ONNX parity: max |diff| {diff:.3g}")
        tolerance = settings.jobs.onnx_parity_tolerance * extra["parity_scale"]
        if diff > tolerance or agreement < 1.0:
            raise ModelError(
                f"ONNX conversion differs from the native model on the holdout (max |diff| {diff:.3g}, label "
                f"agreement {agreement:.3f}); tolerance is {settings.jobs.onnx_parity_tolerance} x "
                f"{extra['parity_scale']:.3g}"
            )
        model_bytes = onnx_model.SerializeToString()
        metrics = score_onnx(model_bytes, data.X_holdout, y_true, data.task, data.classes)
        champion = _champion(client, spec, data, y_true)
        validation = check_gates(spec.validation, metrics, champion)
        mlflow.log_metrics({**{f"holdout_{k}": v for k, v in metrics.items()}, "onnx_max_abs_diff": diff})
        mlflow.log_metrics(metrics)
        mlflow.log_dict(validation.as_dict(), "validation.json")
        result.update({"metrics": metrics, "onnx_max_abs_diff": diff, "validation": validation.as_dict()})
        report({"stage": "validated", "metrics": metrics, "validation": validation.as_dict()},
               f"holdout metrics {json.dumps(metrics)}; gates {'passed' if validation.passed else 'FAILED'}")
        if not validation.passed:
            raise ValidationFailed(
                "validation gates failed: " + "; ".join(validation.failures()) + "; nothing was registered",
                result=result,
            )
        _log_reference_profile(settings, data, y_true, model_bytes, result, report)
        sample = data.X_holdout[:5]
        first_out = np.asarray(onnx_outputs_first(model_bytes, sample))
        signature = infer_signature(sample, first_out)
        report({"stage": "registering"}, "logging the ONNX model to MLflow")
        info = mlflow.onnx.log_model(  # logged only; registered below with every tag at once
            onnx_model, name="model", signature=signature, pip_requirements=["onnxruntime"],
            save_as_external_data=False,
        )
        result["model_uri"] = info.model_uri
    if spec.register_as:
        result.update(_register(client, spec, data, job_id, diff, validation, result["run_id"], info.model_id))
        report({"stage": "done"}, f"registered {spec.register_as} version {result['model_version']} "
               f"{result['aliases'] or ''}".rstrip())
    else:
        report({"stage": "done"}, "trained; not registered (no register_as)")
    return result


def _log_reference_profile(settings: Settings, data: PreparedData, y_true: np.ndarray, model_bytes: bytes,
                           result: dict[str, Any], report: Reporter) -> None:
    """The version's reference profile (``app.monitoring.reference``), logged to the job's run
    before the version is registered, so every version a job registers has one. A profile that
    cannot be made is noted in the result, not a failed job: the model passed its gates."""
    import mlflow

    from app.monitoring.reference import PROFILE_PATH, training_profile

    try:
        profile = training_profile(settings, X_train=data.X_train, feature_names=list(data.feature_names),
                                   X_holdout=data.X_holdout, y_holdout=y_true, model_bytes=model_bytes,
                                   task=data.task, classes=data.classes,
                                   source={"dataset_uri": data.dataset_uri, "dataset_sha256": data.dataset_sha256,
                                           "split": "train"})
        mlflow.log_dict(profile, PROFILE_PATH)
        result["reference_profile"] = PROFILE_PATH
        report({"stage": "profiled"}, f"reference profile: {profile['rows']} rows x {len(profile['features'])} features")
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("no reference profile for this job's version: %s", exc)
        result["reference_profile_error"] = f"{type(exc).__name__}: {exc}"[:500]


def train_sklearn(spec: TrainingJobSpec, settings: Settings, job_id: str, report: Reporter) -> dict[str, Any]:
    """A scikit-learn job end to end (see run_training)."""
    return run_training(spec, settings, job_id, report)


def onnx_outputs_first(model_bytes: bytes, X: np.ndarray) -> np.ndarray:
    from app.training.validation import onnx_outputs

    return onnx_outputs(model_bytes, X)[0]


def _register(client, spec: TrainingJobSpec, data: PreparedData, job_id: str, diff: float,
              validation: ValidationReport, run_id: str, model_id: str) -> dict[str, Any]:
    report_json = json.dumps(validation.as_dict(), separators=(",", ":"), default=str)
    tags = {
        TAG_JOB: job_id,
        TAG_FORMAT: "onnx",
        TAG_PARITY: repr(diff),
        TAG_FEATURES: json.dumps(data.feature_names),
        TAG_TASK: data.task,
        TAG_VALIDATION: "passed",  # ONNX parity and every gate passed, or the job would have failed
        TAG_VALIDATION_REPORT: report_json[:4900],
        TAG_DATASET_URI: data.dataset_uri,
        TAG_DATASET_SHA256: data.dataset_sha256,
        TAG_CODE_VERSION: code_version(),
    }
    if data.task == "classification":
        tags[TAG_CLASSES] = json.dumps(data.classes)
    if data.feature_service:
        from app.features.jobs import lineage_json

        tags[TAG_FEATURE_SERVICE] = lineage_json(data.feature_service)
    version, alias = register_version(
        client, spec.register_as, job_id, source=f"models:/{model_id}", run_id=run_id, model_id=model_id, tags=tags,
        alias_on_pass=spec.validation.alias_on_pass,
    )
    return {"model_name": spec.register_as, "model_version": version, "aliases": [alias]}


def register_version(client, name: str, job_id: str, *, source: str, run_id: str, model_id: str | None,
                     tags: dict[str, str], alias_on_pass: str) -> tuple[str, str]:
    """Register a job's model: (version, alias). Safe to repeat after a crash at any point:

    1. a version tagged ``matih.job_id`` = ``job_id`` is looked for first (an earlier attempt
       may have made it, even if it never saw MLflow's answer);
    2. otherwise ONE ``create_model_version`` carries every ``matih.*`` tag, so a version
       exists fully tagged or not at all;
    3. the alias is set by :func:`ensure_alias`, which leaves it where an earlier attempt put it.
    """
    from mlflow.exceptions import MlflowException

    prior = job_version(client, name, job_id)
    if prior is None:
        try:
            client.create_registered_model(name)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        prior = client.create_model_version(name, source=source, run_id=run_id, tags={**tags, TAG_JOB: job_id},
                                            model_id=model_id)
    version = str(prior.version)
    return version, ensure_alias(client, name, version, alias_on_pass)


def ensure_alias(client, name: str, version: str, alias_on_pass: str) -> str:
    """The alias of a job's new version: ``champion`` for a model's first, else ``alias_on_pass``;
    if an earlier attempt set either on this version already, that one stays (repeatable)."""
    aliases = {a: str(v) for a, v in (client.get_registered_model(name).aliases or {}).items()}
    for alias in ("champion", alias_on_pass):
        if aliases.get(alias) == version:
            return alias
    alias = "champion" if "champion" not in aliases else alias_on_pass
    client.set_registered_model_alias(name, alias, version)
    return alias
