"""Tracking reads: MLflow experiments and runs."""

from __future__ import annotations

import re
from typing import Any

from app.errors import InvalidInput
from app.pagination import mlflow_page_token
from app.registry.base import RegistryBase, _iso, _token


class TrackingMixin(RegistryBase):
    """Reads of MLflow experiments and runs."""

    @staticmethod
    def _experiment_view(e) -> dict[str, Any]:
        return {
            "experiment_id": e.experiment_id,
            "name": e.name,
            "artifact_location": e.artifact_location,
            "lifecycle_stage": e.lifecycle_stage,
            "tags": dict(e.tags or {}),
            "created_at": _iso(getattr(e, "creation_time", None)),
        }

    @staticmethod
    def _run_view(r) -> dict[str, Any]:
        return {
            "run_id": r.info.run_id,
            "run_name": r.info.run_name,
            "experiment_id": r.info.experiment_id,
            "status": r.info.status,
            "start_time": _iso(r.info.start_time),
            "end_time": _iso(r.info.end_time),
            "artifact_uri": r.info.artifact_uri,
            "metrics": dict(r.data.metrics),
            "params": dict(r.data.params),
            "tags": {k: v for k, v in r.data.tags.items() if not k.startswith("mlflow.log-model")},
        }

    def list_experiments(self, limit: int = 50, page_token: str | None = None) -> tuple[list[dict], str | None]:
        with self._mlflow("the experiments"):
            page = self.client.search_experiments(max_results=limit, page_token=mlflow_page_token(page_token))
        return [self._experiment_view(e) for e in page], _token(page.token)

    def list_runs(self, experiment_id: str, limit: int = 50, page_token: str | None = None) -> tuple[list[dict], str | None]:
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", experiment_id):
            raise InvalidInput(f"experiment id {experiment_id!r} is not an MLflow experiment id")
        with self._mlflow(f"experiment {experiment_id!r}", "GET /v1/experiments lists them"):
            self.client.get_experiment(experiment_id)
            page = self.client.search_runs(
                [experiment_id], max_results=limit, page_token=mlflow_page_token(page_token), order_by=["attributes.start_time DESC"]
            )
        return [self._run_view(r) for r in page], _token(page.token)

    def get_run(self, run_id: str) -> dict[str, Any]:
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", run_id):
            raise InvalidInput(f"run id {run_id!r} is not an MLflow run id")
        with self._mlflow(f"run {run_id!r}"):
            return self._run_view(self.client.get_run(run_id))

