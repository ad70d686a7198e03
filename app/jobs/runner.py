"""Runs one job by id: reads its spec from the metadata store, does the work, and records
progress, logs, the result or the error. The scheduler has already moved it to ``running``."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from app.errors import MatihError
from app.settings import Settings
from app.storage.s3 import configure_s3_env
from app.store import MetadataStore

log = logging.getLogger(__name__)


def execute(kind: str, spec: dict[str, Any], settings: Settings, job_id: str, report) -> dict[str, Any]:
    if kind == "training":
        from app.training.pipeline import run_training
        from app.training.spec import TrainingJobSpec, check_spec_paths

        return run_training(check_spec_paths(TrainingJobSpec.model_validate(spec), settings), settings, job_id, report)
    if kind == "batch_prediction":
        from app.batch.predict import run_batch_prediction
        from app.batch.spec import BatchJobSpec, check_spec_paths

        return run_batch_prediction(check_spec_paths(BatchJobSpec.model_validate(spec), settings), settings, job_id, report)
    raise MatihError(f"no runner for job kind {kind!r}", code="unknown_job_kind")


def run_job(job_id: str, settings: Settings, store: MetadataStore | None = None) -> dict[str, Any]:
    """Execute a ``running`` job to its end; returns the stored job. Never raises for job
    failures: they are recorded on the job."""
    configure_s3_env(settings)
    store = store or MetadataStore.from_settings(settings)
    job = store.get_job(job_id)

    def report(progress: dict[str, Any], line: str | None = None) -> None:
        store.update_job_progress(job_id, progress, line)

    try:
        result = execute(job["kind"], job["spec"], settings, job_id, report)
    except MatihError as exc:
        report({}, f"failed: {exc.message}")
        partial = exc.details.get("result") if isinstance(exc.details.get("result"), dict) else None
        extra = {"result": partial} if partial else {}
        return _finish(store, job_id, "failed", error=f"{exc.code}: {exc.message}", **extra)
    except Exception as exc:  # a bug or a library failure: keep the traceback in the logs
        report({}, traceback.format_exc())
        return _finish(store, job_id, "failed", error=f"{type(exc).__name__}: {exc}")
    return _finish(store, job_id, "succeeded", result=result)


def _finish(store: MetadataStore, job_id: str, status: str, **fields: Any) -> dict[str, Any]:
    from app.errors import Conflict

    try:
        return store.transition_job(job_id, status, expect="running", **fields)
    except Conflict:  # cancelled meanwhile: the cancellation stands
        return store.get_job(job_id)
