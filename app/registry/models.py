"""Registered models and reads of their versions (list, detail with metrics, signature and
lineage), and edits of a version's description, intended use and tags."""

from __future__ import annotations

import tempfile
from typing import Any

from app.errors import Conflict, DependencyUnavailable, MatihError, NotFound
from app.pagination import mlflow_page_token
from app.registry.base import (
    TAG_CONVERTED_FROM,
    TAG_INTENDED_USE,
    TAG_REGISTERED_BY,
    TAG_SHA256,
    TAG_SOURCE,
    TAG_SOURCE_KIND,
    RegistryBase,
    _iso,
    _token,
)
from app.registry.checks import check_model_name, check_user_tags
from app.registry.mlflow_registry import (
    TAG_CODE_VERSION,
    TAG_DATASET_SHA256,
    TAG_DATASET_URI,
    TAG_FEATURE_SERVICE,
    TAG_JOB,
)
from app.registry.outbox import OP_DELETE


class ModelsMixin(RegistryBase):
    """Registered models; version lists, details and edits."""

    def _model_view(self, rm) -> dict[str, Any]:
        latest = max((int(v.version) for v in (rm.latest_versions or [])), default=None)
        return {
            "name": rm.name,
            "description": rm.description or "",
            "tags": dict(rm.tags or {}),
            "aliases": {a: str(v) for a, v in (rm.aliases or {}).items()},
            "latest_version": str(latest) if latest else None,
            "created_at": _iso(rm.creation_timestamp),
            "updated_at": _iso(rm.last_updated_timestamp),
        }

    def create_model(self, name: str, actor: str, description: str = "", tags: dict | None = None) -> dict[str, Any]:
        check_model_name(name)
        tags = check_user_tags(tags)
        with self._mlflow(f"model {name!r}", f"PATCH /v1/models/{name} changes it"):
            rm = self.client.create_registered_model(name, tags=tags, description=description or None)
        view = self._model_view(rm)
        self._audit(actor, "model.create", "model", name, None, view)
        return view

    def _ensure_model(self, name: str, actor: str) -> None:
        from mlflow.exceptions import MlflowException

        check_model_name(name)
        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.create_model(name, actor)
            except Conflict:
                pass  # created meanwhile

    def list_models(self, limit: int = 50, page_token: str | None = None) -> tuple[list[dict], str | None]:
        with self._mlflow("the registered models"):
            page = self.client.search_registered_models(max_results=limit, page_token=mlflow_page_token(page_token), order_by=["name ASC"])
        return [self._model_view(rm) for rm in page], _token(page.token)

    def get_model(self, name: str) -> dict[str, Any]:
        return self._model_view(self._rm(name))

    def update_model(
        self, name: str, actor: str, description: str | None = None, tags: dict | None = None
    ) -> dict[str, Any]:
        before = self.get_model(name)
        tags = check_user_tags(tags)
        with self._mlflow(f"model {name!r}"):
            if description is not None:
                self.client.update_registered_model(name, description=description)
            for key, value in tags.items():
                self.client.set_registered_model_tag(name, key, value)
        after = self.get_model(name)
        self._audit(actor, "model.update", "model", name, before, after)
        return after

    def delete_model(self, name: str, actor: str, used_by: list[str] | None = None) -> None:
        """Delete a registered model and its versions, unless an endpoint serves it. Through the
        outbox, with the endpoint check under the model's guard in the metadata store
        (``MetadataStore.begin_model_delete``): an endpoint created at the same moment either
        blocks the delete or is refused, never left pointing at a deleted model. If MLflow
        fails midway the intent stays pending (the model takes no new endpoints or versions)
        until a retry of the delete or recovery finishes it."""
        before = self.get_model(name)
        if used_by:
            raise Conflict(
                f"model {name!r} is served by endpoint(s) {', '.join(sorted(used_by))}; point them elsewhere or "
                "delete them first",
                details={"endpoints": sorted(used_by)},
            )
        op_id = self.store.begin_model_delete(name, actor, {"before": before}) if self.store is not None else None
        try:
            with self._mlflow(f"model {name!r}"):
                self.client.delete_registered_model(name)
        except NotFound:
            pass  # deleted meanwhile: the outcome asked for
        except BaseException as exc:
            if not isinstance(exc, DependencyUnavailable):
                self._finish_op(op_id, "rolled_back", error=getattr(exc, "message", None) or type(exc).__name__)
            raise
        self._finish_op(op_id, "done", audit=(OP_DELETE, "model", name, before, None))

    def list_versions(self, name: str, limit: int = 50, page_token: str | None = None) -> tuple[list[dict], str | None]:
        rm = self._rm(name)
        with self._mlflow(f"versions of {name!r}"):
            page = self.client.search_model_versions(
                f"name = '{name}'", max_results=limit, order_by=["version_number DESC"], page_token=mlflow_page_token(page_token)
            )
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        grants = self._grants(name)
        return [self._version_view(mv, aliases, grants) for mv in page], _token(page.token)

    def get_version(self, name: str, version: str | int, detail: bool = True) -> dict[str, Any]:
        mv = self._mv(name, version)
        view = self._version_view(mv)
        if detail:
            run = self._run(mv.run_id)
            view["metrics"] = dict(run.data.metrics) if run else {}
            view["params"] = dict(run.data.params) if run else {}
            view["signature"] = self._signature(mv)
            view["lineage"] = self._lineage(mv, run)
        return view

    def _signature(self, mv) -> dict[str, Any] | None:
        import mlflow.artifacts
        from mlflow.models import Model

        try:
            uri = self.client.get_model_version_download_uri(mv.name, str(mv.version)).rstrip("/") + "/MLmodel"
            with tempfile.TemporaryDirectory(prefix="matih-mlmodel-") as tmp:
                path = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp)
                sig = Model.load(path).signature
        except Exception:
            return None
        return sig.to_dict() if sig is not None else None

    def _lineage(self, mv, run) -> dict[str, Any]:
        tags = dict(mv.tags or {})
        params = dict(run.data.params) if run else {}
        run_tags = dict(run.data.tags) if run else {}
        return {
            "run_id": mv.run_id,
            "experiment_id": run.info.experiment_id if run else None,
            "job_id": tags.get(TAG_JOB) or run_tags.get(TAG_JOB),
            "dataset_uri": tags.get(TAG_DATASET_URI) or params.get("dataset"),
            "dataset_sha256": tags.get(TAG_DATASET_SHA256),
            "code_version": tags.get(TAG_CODE_VERSION),
            "source_kind": tags.get(TAG_SOURCE_KIND, "job" if tags.get(TAG_JOB) else None),
            "source": tags.get(TAG_SOURCE, mv.source),
            "artifact_sha256": tags.get(TAG_SHA256),
            "converted_from": tags.get(TAG_CONVERTED_FROM),
            "registered_by": tags.get(TAG_REGISTERED_BY),
            "feature_service": _json_tag(tags.get(TAG_FEATURE_SERVICE)),
        }


    def update_version(
        self, name: str, version: str | int, actor: str, description: str | None = None,
        intended_use: str | None = None, tags: dict | None = None,
    ) -> dict[str, Any]:
        before = self._version_view(self._mv(name, version))
        version = before["version"]
        user_tags = check_user_tags(tags)
        with self._mlflow(f"version {version} of {name!r}"):
            if description is not None:
                self.client.update_model_version(name, version, description=description)
        if intended_use is not None:
            user_tags[TAG_INTENDED_USE] = intended_use
        self._set_tags(name, version, user_tags)
        after = self._version_view(self._mv(name, version))
        self._audit(actor, "model_version.update", "model_version", f"{name}/{version}", before, after)
        return after


def endpoints_using(store, name: str) -> list[str]:
    """Names of the endpoints whose target is a version or alias of model ``name``."""
    from app.registry.targets import parse_target

    found, token = [], None
    while True:
        items, token = store.list_endpoints(limit=500, page_token=token)
        for ep in items:
            try:
                ref = parse_target(ep["target"])
            except MatihError:
                continue
            if ref.name == name:
                found.append(ep["name"])
        if not token:
            return found


def _json_tag(value: str | None) -> Any:
    """A JSON tag's value (None when absent or not JSON)."""
    import json

    if not value:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return None
