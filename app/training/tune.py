"""Hyperparameter search with Ray Tune: the ``tune`` block of a training job.

A search is a set of trials. Each trial is a *trial function* (:data:`TrialFn`): it takes the
sampled config and a ``report`` callable, calls ``report(metrics)`` once per epoch (a
scikit-learn fit: once) and returns its final holdout metrics. :func:`run_search` runs the
trial functions under Tune (one actor per trial, ``cpus_per_trial`` each), with the
scheduler of the spec, and hands back the best config and every trial.

MLflow: every trial is a child run of the job's run (tag ``mlflow.parentRunId``) named
``trial-<n>``, with the config as params and each report as metrics at step 1, 2, ... A
trial that ends on its own marks its run FINISHED; one that raised marks it FAILED. A trial
that the scheduler stops (ASHA, the median rule) is cut off inside ``report`` and never
gets to say so, so the driver marks its run KILLED from what Tune knows: a trial that ran to
its end makes one more report after its function returns (the returned metrics and a
``matih_completed`` marker, one more ``training_iteration``), and a trial whose last result
lacks the marker was stopped early.

PBT mutates the uniform, loguniform and choice dimensions of the same search space. Tune
only exploits a trial that saved a checkpoint; the trial functions here save none, so until
they do, pbt runs like a random search (every trial to its end).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ray import tune
from ray.tune import Callback

from app.errors import InvalidInput, MatihError, ModelError
from app.registry.mlflow_registry import TAG_JOB
from app.settings import Settings
from app.training.data import PreparedData
from app.training.spec import (
    CLASSIFICATION_METRICS,
    REGRESSION_METRICS,
    SearchDim,
    TrainingJobSpec,
    TuneSpec,
)

log = logging.getLogger(__name__)

#: A trial function: (sampled config, report) -> final holdout metrics. ``report`` is called
#: once per epoch with that epoch's metrics (which must include the search metric).
TrialFn = Callable[[dict[str, Any], Callable[[dict[str, float]], None]], dict[str, float]]

TAG_PARENT_RUN = "mlflow.parentRunId"
TAG_TRIAL = "matih.trial_id"
#: Trial statuses in :class:`TuneOutcome`.
TERMINATED, STOPPED_EARLY, ERROR = "TERMINATED", "STOPPED_EARLY", "ERROR"

# Keys our trial wrapper adds to each Tune result; never MLflow metrics, never in outcomes.
_COMPLETED = "matih_completed"
_RUN_ID = "matih_run_id"
_MUTABLE_KINDS = ("uniform", "loguniform", "choice")


# -- the search space and the schedulers -----------------------------------------------------
def search_space(space: Mapping[str, SearchDim | dict]) -> dict[str, Any]:
    """The JSON grammar of a tune block as Ray Tune domains (``grid`` -> ``tune.grid_search``)."""
    out: dict[str, Any] = {}
    for name, dim in space.items():
        out[name] = _domain(dim if isinstance(dim, SearchDim) else SearchDim.model_validate(dim))
    return out


def _domain(dim: SearchDim) -> Any:
    kind, args = dim.kind, dim.args
    if kind == "uniform":
        return tune.uniform(args[0], args[1])
    if kind == "loguniform":
        return tune.loguniform(args[0], args[1])
    if kind == "choice":
        return tune.choice(list(args))
    if kind == "randint":
        return tune.randint(args[0], args[1])
    return tune.grid_search(list(args))


def trials_total(tune_spec: TuneSpec) -> int:
    """Trials the search runs: num_samples times every combination of the grid dimensions."""
    total = tune_spec.num_samples
    for dim in tune_spec.search_space.values():
        if dim.kind == "grid":
            total *= len(dim.args)
    return total


def make_scheduler(tune_spec: TuneSpec, max_t: int):
    """The trial scheduler of the spec, or None to run every trial to its end.

    ``max_t`` is the number of reports a full trial makes (its epochs; 1 for scikit-learn).
    Time is counted in reports (``training_iteration``). The metric and mode are left to
    ``TuneConfig``, which hands them to the scheduler.

    - asha: asynchronous successive halving; rungs at 1, 4, 16, ... reports below ``max_t``.
      A trial that clears the last rung runs to its own end (``stop_last_trials=False``), so
      the trial function returns and its final metrics are reported.
    - median: stops a trial whose running mean is below the median of the others' at the
      same point, once three trials have got there.
    - pbt: population-based training over the uniform, loguniform and choice dimensions,
      perturbing every quarter of ``max_t`` (see the module docstring about checkpoints).
    """
    from ray.tune.schedulers import ASHAScheduler, MedianStoppingRule, PopulationBasedTraining

    max_t = max(1, int(max_t))
    name = tune_spec.scheduler
    if name is None:
        return None
    if name == "asha":
        return ASHAScheduler(
            time_attr="training_iteration", max_t=max_t, grace_period=1, reduction_factor=4, stop_last_trials=False
        )
    if name == "median":
        return MedianStoppingRule(time_attr="training_iteration", grace_period=1, min_samples_required=3)
    if name == "pbt":
        mutations = {
            key: _domain(dim) for key, dim in tune_spec.search_space.items() if dim.kind in _MUTABLE_KINDS
        }
        if not mutations:
            raise InvalidInput(
                "scheduler 'pbt' mutates uniform, loguniform or choice dimensions and the search space has none; "
                "add one or choose scheduler 'asha' or 'median'",
                details={"field": "tune.scheduler"},
            )
        return PopulationBasedTraining(
            time_attr="training_iteration", perturbation_interval=max(1, max_t // 4), hyperparam_mutations=mutations
        )
    raise InvalidInput(f"unknown scheduler {name!r}; choose asha, median or pbt", details={"field": "tune.scheduler"})


def max_reports(spec: TrainingJobSpec) -> int:
    """Reports a full trial makes: 1 for scikit-learn; the most epochs a trial can get for torch."""
    if spec.framework != "torch":
        return 1
    epochs = spec.torch_hparams().epochs
    dim = spec.tune.search_space.get("epochs") if spec.tune else None
    if dim is not None:
        if dim.kind in ("choice", "grid"):
            epochs = max(int(v) for v in dim.args)
        elif dim.kind == "randint":
            epochs = int(dim.args[1]) - 1
        else:
            epochs = int(dim.args[1])
    return max(1, epochs)


# -- running a search -------------------------------------------------------------------------
@dataclass
class TuneOutcome:
    """What a search found: the config, metrics and id of the best trial (by the search
    metric, among the trials that ran to their end), and ``trials``: one dict per trial,
    ordered by trial number, with ``trial_id``, ``config``, ``metrics`` (the last reported),
    ``status`` (TERMINATED, STOPPED_EARLY or ERROR), ``mlflow_run_id`` (None without a
    parent run) and ``error`` (None, or the trial's error in one line)."""

    best_config: dict[str, Any]
    best_metrics: dict[str, float]
    trials: list[dict[str, Any]] = field(default_factory=list)
    best_trial_id: str = ""


@dataclass(frozen=True)
class _TrialContext:
    """What each trial needs besides its config: small and picklable (no Settings, no clients)."""

    job_id: str
    parent_run_id: str | None
    experiment_id: str | None
    tracking_uri: str
    mlflow_timeout_s: int
    mlflow_retries: int


def run_search(
    spec: TrainingJobSpec,
    settings: Settings,
    job_id: str,
    parent_run_id: str | None,
    trial_fn: TrialFn,
    storage_path: str,
) -> TuneOutcome:
    """Run the tune block of ``spec`` with ``trial_fn`` as each trial; return the best.

    Trials run as Tune actors with ``tune.cpus_per_trial`` CPUs (and the spec's
    ``gpus_per_worker`` GPUs), at most ``tune.max_concurrent`` at once; Tune's results go to
    ``storage_path``/``<job_id>-tune``. With ``parent_run_id`` every trial is an MLflow child
    run of it; progress ({"stage": "tuning", "trials_done", "trials_total"}) is written on the
    job as trials end. Raises the trials' own error when every trial failed.
    """
    if spec.tune is None:
        raise InvalidInput("the spec has no tune block", details={"field": "tune"})
    ts = spec.tune
    experiment_id = None
    if parent_run_id is not None:
        from mlflow import MlflowClient

        from app.registry.mlflow_registry import configure_mlflow_client, ensure_experiment

        configure_mlflow_client(settings.mlflow_request_timeout_s, settings.mlflow_request_retries)
        experiment_id = ensure_experiment(MlflowClient(settings.mlflow_tracking_uri), settings)
    context = _TrialContext(
        job_id=job_id,
        parent_run_id=parent_run_id,
        experiment_id=experiment_id,
        tracking_uri=settings.mlflow_tracking_uri,
        mlflow_timeout_s=settings.mlflow_request_timeout_s,
        mlflow_retries=settings.mlflow_request_retries,
    )
    resources: dict[str, float] = {"cpu": ts.cpus_per_trial}
    if spec.resources.gpus_per_worker:
        resources["gpu"] = spec.resources.gpus_per_worker
    total = trials_total(ts)
    progress = _Progress(settings.database_url, settings.mlflow_tracking_uri, job_id, total, ts.metric)
    if "://" not in storage_path:
        storage_path = os.path.abspath(storage_path)

    tuner = tune.Tuner(
        tune.with_resources(tune.with_parameters(_run_trial, trial_fn=trial_fn, context=context), resources),
        param_space=search_space(ts.search_space),
        tune_config=tune.TuneConfig(
            metric=ts.metric,
            mode=ts.mode,
            num_samples=ts.num_samples,
            scheduler=make_scheduler(ts, max_reports(spec)),
            max_concurrent_trials=ts.max_concurrent,
            reuse_actors=True,  # trial functions keep no state; a new process per trial costs its imports
        ),
        run_config=tune.RunConfig(
            name=f"{job_id}-tune", storage_path=storage_path, callbacks=[progress], verbose=0
        ),
    )
    grid = tuner.fit()
    results = [grid[i] for i in range(len(grid))]

    trials = [_trial_record(result) for result in results]
    trials.sort(key=lambda t: (_trial_number(t["trial_id"]), t["trial_id"]))
    if parent_run_id is not None:
        _settle_mlflow_runs(settings, experiment_id, job_id, parent_run_id, trials)
    return _outcome(trials, ts, [r.error for r in results if r.error is not None])


def _trial_record(result) -> dict[str, Any]:
    raw = dict(result.metrics or {})
    if result.error is not None:
        status = ERROR
    elif raw.get(_COMPLETED):
        status = TERMINATED
    else:
        status = STOPPED_EARLY
    return {
        "trial_id": str(raw.get("trial_id", "")),
        "config": dict(result.config or {}),
        "metrics": _user_metrics(raw),
        "status": status,
        "mlflow_run_id": raw.get(_RUN_ID) or None,
        "error": _error_text(result.error) if result.error is not None else None,
    }


def _user_metrics(raw: Mapping[str, Any]) -> dict[str, float]:
    """What the trial function reported: numbers, without Tune's own bookkeeping."""
    from ray.tune.result import AUTO_RESULT_KEYS, DEBUG_METRICS

    skip = set(AUTO_RESULT_KEYS) | set(DEBUG_METRICS) | {"done", "should_checkpoint", "experiment_tag"}
    return {
        k: float(v)
        for k, v in raw.items()
        if k not in skip and not k.startswith("matih_") and isinstance(v, (int, float)) and not isinstance(v, bool)
    }


def _outcome(trials: list[dict[str, Any]], ts: TuneSpec, errors: list[BaseException]) -> TuneOutcome:
    def usable(t: dict[str, Any]) -> bool:
        value = t["metrics"].get(ts.metric)
        return value is not None and math.isfinite(value)

    # Trials that ran to their end first; a trial stopped early reports an intermediate epoch.
    candidates = [t for t in trials if t["status"] == TERMINATED and usable(t)]
    candidates = candidates or [t for t in trials if t["status"] != ERROR and usable(t)]
    if not candidates:
        if errors and all(t["status"] == ERROR for t in trials):
            cause = _matih_cause(errors[0])
            if cause is not None:
                raise cause
            raise ModelError(f"every trial of the search failed; the first: {_error_text(errors[0])}")
        raise InvalidInput(
            f"no trial reported the search metric {ts.metric!r}; set tune.metric to a metric the trials report",
            details={"field": "tune.metric"},
        )
    pick = max if ts.mode == "max" else min
    best = pick(candidates, key=lambda t: t["metrics"][ts.metric])
    return TuneOutcome(
        best_config=dict(best["config"]), best_metrics=dict(best["metrics"]), trials=trials,
        best_trial_id=best["trial_id"],
    )


def _matih_cause(exc: BaseException | None) -> MatihError | None:
    """The MatihError a trial raised, through Tune's and Ray's wrappers."""
    for _ in range(10):
        if exc is None or isinstance(exc, MatihError):
            return exc
        cause = getattr(exc, "cause", None)
        exc = cause if isinstance(cause, BaseException) else exc.__cause__
    return None


def _error_text(exc: BaseException) -> str:
    cause = _matih_cause(exc)
    if cause is not None:
        return f"{cause.code}: {cause.message}"
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(exc).__name__


def _trial_number(trial_id: str) -> int:
    """Tune's trial ids end in the trial's index (``3f2a1_00004`` -> 4)."""
    tail = trial_id.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


# -- inside a trial ---------------------------------------------------------------------------
def _run_trial(config: dict[str, Any], *, trial_fn: TrialFn, context: _TrialContext) -> None:
    """The Tune function trainable: wraps ``trial_fn`` with MLflow logging and Tune reports."""
    trial_id = tune.get_context().get_trial_id()
    run = _TrialRun.start(context, trial_id, config) if context.parent_run_id is not None else None
    extra = {_RUN_ID: run.run_id} if run is not None else {}
    step = 0
    last: dict[str, float] = {}

    def report(metrics: dict[str, float]) -> None:
        nonlocal step, last
        step += 1
        last = {k: float(v) for k, v in metrics.items()}
        if run is not None:
            run.log(last, step)
        tune.report({**last, **extra})  # a scheduler's stop ends the trial in here

    try:
        final = {k: float(v) for k, v in (trial_fn(dict(config), report) or {}).items()}
    except Exception:
        if run is not None:
            run.end("FAILED")
        raise
    if run is not None:
        if final and final != last:
            run.log(final, max(step, 1))
        run.end("FINISHED")
    tune.report({**(final or last), **extra, _COMPLETED: 1})


class _TrialRun:
    """The MLflow child run of one trial."""

    def __init__(self, client, run_id: str):
        self.client = client
        self.run_id = run_id

    @classmethod
    def start(cls, context: _TrialContext, trial_id: str, config: Mapping[str, Any]) -> _TrialRun:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        from app.registry.mlflow_registry import configure_mlflow_client

        configure_mlflow_client(context.mlflow_timeout_s, context.mlflow_retries)
        client = MlflowClient(context.tracking_uri)
        run = client.create_run(
            str(context.experiment_id),
            run_name=f"trial-{_trial_number(trial_id)}",
            tags={TAG_PARENT_RUN: context.parent_run_id, TAG_JOB: context.job_id, TAG_TRIAL: trial_id},
        )
        params = [Param(str(k), str(v)[:6000]) for k, v in sorted(config.items())]
        if params:
            client.log_batch(run.info.run_id, params=params)
        return cls(client, run.info.run_id)

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if math.isfinite(float(v))]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def end(self, status: str) -> None:
        self.client.set_terminated(self.run_id, status)


# -- in the driver ----------------------------------------------------------------------------
def _settle_mlflow_runs(settings: Settings, experiment_id: str | None, job_id: str, parent_run_id: str,
                        trials: list[dict[str, Any]]) -> None:
    """Find every trial's run (also those that failed before their first report) and give
    runs the trial could not end itself their final status: KILLED when stopped early,
    FAILED on error. Idempotent; an MLflow outage leaves the runs as they are."""
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    try:
        runs = client.search_runs(
            [str(experiment_id)],
            filter_string=f"tags.`{TAG_PARENT_RUN}` = '{parent_run_id}' and tags.`{TAG_JOB}` = '{job_id}'",
            max_results=5000,
        )
        by_trial = {r.data.tags.get(TAG_TRIAL): r for r in runs}
        for trial in trials:
            run = by_trial.get(trial["trial_id"])
            if run is None:
                continue
            trial["mlflow_run_id"] = run.info.run_id
            wanted = {TERMINATED: "FINISHED", STOPPED_EARLY: "KILLED", ERROR: "FAILED"}[trial["status"]]
            if run.info.status != wanted:
                client.set_terminated(run.info.run_id, wanted)
    except Exception:  # the search is done and its result stands; statuses are cosmetic
        log.warning("could not settle the MLflow runs of the trials of job %s", job_id, exc_info=True)


class _Progress(Callback):
    """A Tune callback in the driver: as each trial ends, write the job's progress and a log
    line, and end the MLflow run of a trial the scheduler stopped. Best effort: a failure
    here is logged and never fails the search. Stores and clients are made on first use, so
    the callback pickles (Tune saves it with the experiment)."""

    def __init__(self, database_url: str, tracking_uri: str, job_id: str, total: int, metric: str):
        self.database_url = database_url
        self.tracking_uri = tracking_uri
        self.job_id = job_id
        self.total = total
        self.metric = metric
        self._done: set[str] = set()
        self._store: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_store": None}

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        result = dict(trial.last_result or {})
        self._ended(trial.trial_id, TERMINATED if result.get(_COMPLETED) else STOPPED_EARLY, result)

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self._ended(trial.trial_id, ERROR, dict(trial.last_result or {}))

    def _ended(self, trial_id: str, status: str, result: dict[str, Any]) -> None:
        self._done.add(trial_id)
        value = result.get(self.metric)
        line = f"trial-{_trial_number(trial_id)} {status.lower().replace('_', ' ')}" + (
            f": {self.metric}={value:.4g}" if isinstance(value, (int, float)) else ""
        )
        try:
            if self._store is None:
                from app.store import MetadataStore

                self._store = MetadataStore(self.database_url)
            self._store.update_job_progress(
                self.job_id, {"stage": "tuning", "trials_done": len(self._done), "trials_total": self.total}, line
            )
        except Exception as exc:
            log.warning("could not record tuning progress of job %s: %s", self.job_id, exc)
        run_id = result.get(_RUN_ID)
        if run_id and status != TERMINATED:
            try:
                from mlflow import MlflowClient

                ended = "KILLED" if status == STOPPED_EARLY else "FAILED"
                MlflowClient(self.tracking_uri).set_terminated(run_id, ended)
            except Exception as exc:
                log.warning("could not end the MLflow run %s: %s", run_id, exc)


# -- trial functions --------------------------------------------------------------------------
class _SklearnTrial:
    """Fit the spec's estimator with {**hyperparameters, **config}; report and return the
    holdout metrics. A class rather than a closure so the pickled trial is explicit."""

    def __init__(self, spec: TrainingJobSpec, data: PreparedData, allowed: list[str]):
        self.estimator = spec.estimator or ""
        self.hyperparameters = dict(spec.hyperparameters)
        self.data = data
        self.allowed = list(allowed)

    def __call__(self, config: dict[str, Any], report: Callable[[dict[str, float]], None]) -> dict[str, float]:
        from sklearn.base import is_classifier

        from app.training.sklearn_trainer import resolve_estimator
        from app.training.validation import classification_metrics, regression_metrics

        cls = resolve_estimator(self.estimator, self.allowed)
        params = {**self.hyperparameters, **config}
        try:
            est = cls(**params)
        except TypeError as exc:
            raise InvalidInput(f"hyperparameters {params} do not fit {self.estimator}: {exc}",
                               details={"field": "tune.search_space"}) from None
        d = self.data
        try:
            est.fit(d.X_train, d.y_train)
        except ValueError as exc:
            raise InvalidInput(f"fit failed with {params}: {exc}", details={"field": "tune.search_space"}) from None
        if is_classifier(est):
            proba = est.predict_proba(d.X_holdout) if hasattr(est, "predict_proba") else None
            classes = [c.item() if hasattr(c, "item") else c for c in est.classes_]
            metrics = classification_metrics(d.y_holdout, est.predict(d.X_holdout), proba, classes)
        else:
            metrics = regression_metrics(d.y_holdout, est.predict(d.X_holdout))
        report(metrics)
        return metrics


def sklearn_trial_fn(spec: TrainingJobSpec, data: PreparedData, settings: Settings) -> TrialFn:
    """The trial function of a scikit-learn job. Checks now, in the driver, that the
    estimator is allowed and that the search metric is one this task reports."""
    from app.training.sklearn_trainer import resolve_estimator

    resolve_estimator(spec.estimator or "", settings.jobs.allowed_estimators)
    if spec.tune is not None:
        allowed = CLASSIFICATION_METRICS if data.task == "classification" else REGRESSION_METRICS
        if spec.tune.metric not in allowed:
            raise InvalidInput(
                f"tune.metric {spec.tune.metric!r} is not a {data.task} metric; choose one of: {', '.join(allowed)}",
                details={"field": "tune.metric"},
            )
    return _SklearnTrial(spec, data, settings.jobs.allowed_estimators)


class _TorchTrial:
    """Train the spec's zoo model in this process with {**hyperparameters, **config}
    (``app.training.torch_loop.train_in_process``); each epoch's holdout metrics are a report."""

    def __init__(self, spec: TrainingJobSpec, data: PreparedData):
        self.spec = spec
        self.data = data

    def __call__(self, config: dict[str, Any], report: Callable[[dict[str, float]], None]) -> dict[str, float]:
        from app.training.torch_loop import train_in_process

        _model, metrics = train_in_process(
            self.spec, self.data, {**self.spec.hyperparameters, **config}, lambda _epoch, m: report(m)
        )
        return metrics


def torch_trial_fn(spec: TrainingJobSpec, data: PreparedData, settings: Settings) -> TrialFn:
    """The trial function of a torch job (``app.training.torch_train`` is imported in the trial)."""
    return _TorchTrial(spec, data)
