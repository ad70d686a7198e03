"""What every part of the registry service shares: the platform's own version tags, MLflow's
errors as ours, the audit hook, and the version view.

``RegistryService`` (``app/registry/service.py``) is composed of the mixins in
``app/registry/models.py``, ``registration.py``, ``lifecycle.py``, ``cards.py`` and
``tracking.py``, each built on ``RegistryBase``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Any

from app.errors import DependencyUnavailable, MatihError
from app.registry import formats as F
from app.registry.checks import check_model_name, check_version
from app.registry.mlflow_registry import (
    TAG_STAGE,
    TAG_VALIDATION,
    ModelRegistry,
    ResolvedModel,
    ensure_experiment,
    mlflow_error,
    model_metadata,
)
from app.registry.outbox import new_nonce
from app.settings import Settings

TAG_INTENDED_USE = "matih.intended_use"
TAG_APPROVED_AT = "matih.approved_at"
TAG_APPROVAL_COMMENT = "matih.approval_comment"
TAG_TRUSTED_BY = "matih.trusted_by"
TAG_TRUSTED_AT = "matih.trusted_at"
TAG_REGISTERED_BY = "matih.registered_by"
TAG_SOURCE_KIND = "matih.source_kind"  # run | job | uri | upload | conversion
TAG_SOURCE = "matih.source"  # the run, URI or upload file the version came from
TAG_SHA256 = "matih.artifact_sha256"  # of the uploaded or referenced model file
TAG_CONVERTED_FROM = "matih.converted_from"


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat() if ms else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _token(tok: Any) -> str | None:
    if not tok:
        return None
    return tok.decode() if isinstance(tok, bytes) else str(tok)


class RegistryBase:
    """Plain Python over ``MlflowClient``; one per process. ``store`` receives the audit log."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store=None):
        self.settings = settings
        self.registry = registry
        self.client = registry.client
        self.store = store

    # -- plumbing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mlflow(self, what: str, fix: str = "") -> Iterator[None]:
        """MLflow's errors as ours (:func:`app.registry.mlflow_registry.mlflow_error`): unknown ->
        NotFound, exists -> Conflict, MLflow's 400 -> RegistryRejected, 401/403 -> RegistryForbidden."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MatihError:
            raise
        except MlflowException as exc:
            raise mlflow_error(exc, what, fix) from None
        except (ConnectionError, TimeoutError) as exc:
            raise DependencyUnavailable(f"MLflow is unavailable: {exc}") from None

    def _audit(self, actor: str, action: str, rtype: str, rid: str, before: Any, after: Any) -> None:
        if self.store is not None:
            self.store.record_audit(actor, action, rtype, rid, before, after)

    # -- the outbox (app/registry/outbox.py) ------------------------------------------------
    def _begin_op(
        self, op: str, name: str, actor: str, payload: dict[str, Any], version: str | None = None
    ) -> tuple[int | None, str | None]:
        """Write a mutation's intent before its MLflow calls: (op id, nonce); (None, None) without a store."""
        if self.store is None:
            return None, None
        nonce = new_nonce()
        return self.store.begin_op(op, name, actor, {**payload, "nonce": nonce}, version=version), nonce

    def _finish_op(
        self, op_id: int | None, state: str = "done", *, version: str | None = None, error: str | None = None,
        audit: tuple[str, str, str, Any, Any] | None = None,
    ) -> None:
        """Complete (with its audit record, in one transaction) or roll back an op."""
        if op_id is not None:
            self.store.finish_op(op_id, state, version=version, error=error, audit=audit)

    def _experiment_id(self) -> str:
        return ensure_experiment(self.client, self.settings)

    def _rm(self, name: str):
        check_model_name(name)
        with self._mlflow(f"model {name!r}", "GET /v1/models lists the registered models"):
            return self.client.get_registered_model(name)

    def _mv(self, name: str, version: str | int):
        check_model_name(name)
        version = check_version(version)
        with self._mlflow(f"version {version} of model {name!r}", f"GET /v1/models/{name}/versions lists them"):
            return self.client.get_model_version(name, version)

    def _set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        with self._mlflow(f"version {version} of {name!r}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(name, version, key, value)


    def _grants(self, name: str) -> tuple[dict[str, dict], dict[str, list[dict]]]:
        """(version -> trust record, version -> approvals) of ``name`` from the metadata store,
        the authority on both (the matih.trusted / matih.approved_by tags only mirror them)."""
        if self.store is None:
            return {}, {}
        approvals: dict[str, list[dict]] = {}
        for a in self.store.approvals(name):
            approvals.setdefault(a["version"], []).append(a)
        return self.store.trust_of_model(name), approvals

    def _require_store(self, what: str) -> Any:
        if self.store is None:
            raise DependencyUnavailable(f"{what} live in the metadata store, and this registry service has none")
        return self.store

    def _version_view(
        self, mv, aliases: dict[str, str] | None = None,
        grants: tuple[dict[str, dict], dict[str, list[dict]]] | None = None,
    ) -> dict[str, Any]:
        tags = dict(mv.tags or {})
        trust, approvals = grants if grants is not None else self._grants(mv.name)
        record = trust.get(str(mv.version))
        approved = approvals.get(str(mv.version)) or []
        meta = model_metadata(ResolvedModel(mv.name, str(mv.version), tags, record["sha256"] if record else None))
        if aliases is None:
            mine = list(mv.aliases or [])
        else:
            mine = sorted(a for a, v in aliases.items() if str(v) == str(mv.version))
        return {
            "name": mv.name,
            "version": str(mv.version),
            "description": mv.description or "",
            "status": mv.status,
            "source": mv.source,
            "run_id": mv.run_id,
            "created_at": _iso(mv.creation_timestamp),
            "updated_at": _iso(mv.last_updated_timestamp),
            "aliases": mine,
            "stage": tags.get(TAG_STAGE, "none"),
            "format": meta["format"],
            "formats": meta["formats"],
            "trusted": meta["trusted"] if meta["format"] in F.PICKLE_FORMATS else None,
            "validation": tags.get(TAG_VALIDATION, "none"),
            "approved_by": approved[-1]["by"] if approved else None,
            "intended_use": tags.get(TAG_INTENDED_USE, ""),
            "task": meta["task"],
            "feature_names": meta["feature_names"],
            "classes": meta["classes"],
            "tags": tags,
        }

    def _run(self, run_id: str | None):
        from mlflow.exceptions import MlflowException

        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None  # the run was deleted; the version stands on its own
