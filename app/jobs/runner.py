"""Runs one job by id: reads its spec from the metadata store, does the work, and records
progress, logs, the result or the error. The scheduler has already moved it to ``running``."""

from __future__ import annotations

import logging
import traceback
from typing import Any

import tenacity

from app.errors import DependencyUnavailable, MatihError
from app.settings import Settings
from app.storage.s3 import configure_s3_env
from app.store import MetadataStore

log = logging.getLogger(__name__)


def execute(kind: str, spec: dict[str, Any], settings: Settings, job_id: str, report) -> dict[str, Any]:
    if kind == "training":
        from app.training.pipeline import run_training
        from app.training.spec import TrainingJobSpec, check_spec_paths

        training = check_spec_paths(TrainingJobSpec.model_validate(spec), settings)
        return run_training(training, settings, job_id, report)
    if kind == "batch_prediction":
        from app.batch.predict import run_batch_prediction
        from app.batch.spec import BatchJobSpec, check_spec_paths

        batch = check_spec_paths(BatchJobSpec.model_validate(spec), settings)
        return run_batch_prediction(batch, settings, job_id, report)
    if kind == "ensemble":
        from app.ensembles.spec import EnsembleSpec, check_ensemble_spec
        from app.ensembles.training import run_ensemble_job

        ensemble = check_ensemble_spec(EnsembleSpec.model_validate(spec), settings)
        return run_ensemble_job(ensemble, settings, job_id, report)
    if kind == "feature_materialize":
        from app.features.jobs import MaterializeSpec, parse_spec, run_materialize

        return run_materialize(parse_spec(MaterializeSpec, spec), settings, job_id, report)
    if kind == "feature_historical":
        from app.features.jobs import HistoricalSpec, check_historical_paths, parse_spec, run_historical

        historical = check_historical_paths(parse_spec(HistoricalSpec, spec), settings)
        return run_historical(historical, settings, job_id, report)
    if kind == "monitor_run":
        from app.monitoring.service import run_monitor_job

        return run_monitor_job(spec, settings, job_id, report)
    if kind == "reference_profile":
        from app.monitoring.reference import dataset_profile

        return dataset_profile(settings, spec["model"], spec["version"], spec, report)
    raise MatihError(f"no runner for job kind {kind!r}", code="unknown_job_kind")


def run_job(job_id: str, settings: Settings, store: MetadataStore | None = None) -> dict[str, Any]:
    """Execute a ``running`` job to its end; returns the stored job. Never raises for job
    failures: they are recorded on the job."""
    configure_s3_env(settings)
    store = store or MetadataStore.from_settings(settings)
    job = store.get_job(job_id)

    def report(progress: dict[str, Any], line: str | None = None) -> None:
        store.update_job_progress(job_id, progress, line)

    def note(line: str) -> None:  # the end is recorded below, with retries; a lost log line is no loss
        try:
            report({}, line)
        except DependencyUnavailable:
            log.warning("job %s: %s", job_id, line)

    retry_s = settings.jobs.finish_retry_s
    try:
        result = execute(job["kind"], job["spec"], settings, job_id, report)
    except MatihError as exc:
        note(f"failed: {exc.message}")
        partial = exc.details.get("result") if isinstance(exc.details.get("result"), dict) else None
        extra = {"result": partial} if partial else {}
        return _finish(store, job_id, "failed", retry_s, error=f"{exc.code}: {exc.message}", **extra)
    except Exception as exc:  # a bug or a library failure: keep the traceback in the logs
        note(traceback.format_exc())
        return _finish(store, job_id, "failed", retry_s, error=f"{type(exc).__name__}: {exc}")
    return _finish(store, job_id, "succeeded", retry_s, result=result)


def _finish(store: MetadataStore, job_id: str, status: str, retry_s: float = 120.0, **fields: Any) -> dict[str, Any]:
    """Record the job's end. The work is done: a store that is briefly down must not lose it,
    so the transition is retried for ``retry_s`` (settings.jobs.finish_retry_s; it is a
    compare-and-set from ``running``, safe to repeat). Past that the process ends and the
    scheduler fails the job ("ended before it recorded its result")."""
    from app.errors import Conflict

    retrying = tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(DependencyUnavailable),
        wait=tenacity.wait_exponential(multiplier=0.5, max=10),
        stop=tenacity.stop_after_delay(retry_s),
        before_sleep=lambda state: log.warning(
            "recording the end of job %s failed (%s); trying again", job_id, state.outcome.exception()
        ),
        reraise=True,
    )
    try:
        return retrying(store.transition_job, job_id, status, expect="running", **fields)
    except Conflict:  # cancelled meanwhile, or an earlier try went through: what is stored stands
        return retrying(store.get_job, job_id)
