"""The model registry API's logic over MLflow's own client: registered models, versions,
aliases, stages and approvals, trust, conversion, model cards, and tracking reads.

MLflow is the registry, not a copy: everything here is read from and written to MLflow
(descriptions, tags, aliases, runs, artifacts), so MLflow's UI and client show the same
state. Tags written by the platform start with ``matih.``; callers may not set those.

Every mutation records an audit entry in the metadata store (who, what, before, after).
The HTTP layer (``app/api/registry.py``) adds roles and cache invalidation.

Stage rules (``POST .../stage``):

- ``staging`` and ``production`` are the aliases of the same names plus the tag
  ``matih.stage``; moving one to a version takes it from the version that held it (which
  loses its stage, or is archived with ``archive_existing``).
- ``production`` needs ``matih.validation=passed`` (``registry.production_requires_validation``),
  an admin's approval (``registry.production_requires_approval``), and, for pickle-based
  versions, trust. An archived version goes back to ``staging`` first.
- ``archived`` removes every alias from the version and sets the tag; archived versions are
  never served (``check_servable``) and take no aliases until restored to staging.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from app.errors import Conflict, DependencyUnavailable, InvalidInput, MatihError, NotFound
from app.names import parse_version
from app.pagination import mlflow_page_token
from app.registry import formats as F
from app.registry.mlflow_registry import (
    TAG_APPROVED_BY,
    TAG_CLASSES,
    TAG_CODE_VERSION,
    TAG_DATASET_SHA256,
    TAG_DATASET_URI,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_JOB,
    TAG_PARITY,
    TAG_VALIDATION_REPORT,
    TAG_STAGE,
    TAG_TASK,
    TAG_TRUSTED,
    TAG_VALIDATION,
    ModelRegistry,
    ResolvedModel,
    ensure_experiment,
    model_metadata,
)
from app.registry.paths import check_relative_path, is_object_store, resolve_source
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

STAGES = ("staging", "production", "archived")
STAGE_ALIASES = ("staging", "production")
_ALIAS_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LINEAGE_TAGS = (TAG_JOB, TAG_DATASET_URI, TAG_DATASET_SHA256, TAG_CODE_VERSION, TAG_TASK, TAG_FEATURES, TAG_CLASSES)


def _iso(ms: int | None) -> str | None:
    return datetime.fromtimestamp(ms / 1000, tz=timezone.utc).isoformat() if ms else None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()


def _token(tok: Any) -> str | None:
    if not tok:
        return None
    return tok.decode() if isinstance(tok, bytes) else str(tok)


def check_model_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInput(
            f"model name {name!r} must start with a letter or digit and hold only letters, digits, '_', '.', '-' "
            "(at most 128 characters)",
            details={"field": "name"},
        )
    return name


def check_version(version: str | int) -> str:
    return parse_version(version)


def check_alias(alias: str) -> str:
    if not _ALIAS_RE.match(alias or "") or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise InvalidInput(
            f"alias {alias!r} must start with a letter, hold letters, digits, '_' or '-' (at most 64), and not be "
            "'latest' or v<number> (MLflow reserves those)",
            details={"field": "alias"},
        )
    return alias


def check_user_tags(tags: dict[str, Any] | None) -> dict[str, str]:
    out = {}
    for key, value in (tags or {}).items():
        if not isinstance(key, str) or not key or key.startswith(("matih.", "mlflow.")):
            raise InvalidInput(
                f"tag {key!r} is reserved or empty: 'matih.' and 'mlflow.' tags are set by the platform; "
                "choose another key",
                details={"field": "tags"},
            )
        out[key] = str(value)
    return out


class RegistryService:
    """Plain Python over ``MlflowClient``; one per process. ``store`` receives the audit log."""

    def __init__(self, settings: Settings, registry: ModelRegistry, store=None):
        self.settings = settings
        self.registry = registry
        self.client = registry.client
        self.store = store

    # -- plumbing --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _mlflow(self, what: str, fix: str = "") -> Iterator[None]:
        """MLflow's errors as ours: unknown -> NotFound, exists -> Conflict, bad value -> InvalidInput."""
        from mlflow.exceptions import MlflowException

        try:
            yield
        except MatihError:
            raise
        except MlflowException as exc:
            code = getattr(exc, "error_code", "")
            msg = getattr(exc, "message", str(exc))
            if code == "RESOURCE_DOES_NOT_EXIST" or "not found" in msg.lower() or "does not exist" in msg.lower():
                raise NotFound(f"{what} does not exist{'; ' + fix if fix else ''}") from None
            if code == "RESOURCE_ALREADY_EXISTS" or "already exists" in msg.lower():
                raise Conflict(f"{what} exists already{'; ' + fix if fix else ''}") from None
            if code == "INVALID_PARAMETER_VALUE":
                raise InvalidInput(f"{what}: {msg}") from None
            raise DependencyUnavailable(f"MLflow failed on {what}: {msg}") from None
        except (ConnectionError, TimeoutError) as exc:
            raise DependencyUnavailable(f"MLflow is unavailable: {exc}") from None

    def _audit(self, actor: str, action: str, rtype: str, rid: str, before: Any, after: Any) -> None:
        if self.store is not None:
            self.store.record_audit(actor, action, rtype, rid, before, after)

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

    # -- registered models -----------------------------------------------------------------
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
            page = self.client.search_registered_models(
                max_results=limit, page_token=mlflow_page_token(page_token), order_by=["name ASC"]
            )
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

    def delete_model(self, name: str, actor: str, used_by: list[str]) -> None:
        """Delete a registered model and its versions, unless an endpoint serves it."""
        before = self.get_model(name)
        if used_by:
            raise Conflict(
                f"model {name!r} is served by endpoint(s) {', '.join(sorted(used_by))}; point them elsewhere or "
                "delete them first",
                details={"endpoints": sorted(used_by)},
            )
        with self._mlflow(f"model {name!r}"):
            self.client.delete_registered_model(name)
        self._audit(actor, "model.delete", "model", name, before, None)

    # -- versions: views -------------------------------------------------------------------
    def _version_view(self, mv, aliases: dict[str, str] | None = None) -> dict[str, Any]:
        tags = dict(mv.tags or {})
        meta = model_metadata(ResolvedModel(mv.name, str(mv.version), tags))
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
            "approved_by": tags.get(TAG_APPROVED_BY),
            "intended_use": tags.get(TAG_INTENDED_USE, ""),
            "task": meta["task"],
            "feature_names": meta["feature_names"],
            "classes": meta["classes"],
            "tags": tags,
        }

    def list_versions(self, name: str, limit: int = 50, page_token: str | None = None) -> tuple[list[dict], str | None]:
        rm = self._rm(name)
        with self._mlflow(f"versions of {name!r}"):
            page = self.client.search_model_versions(
                f"name = '{name}'", max_results=limit, order_by=["version_number DESC"],
                page_token=mlflow_page_token(page_token),
            )
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        return [self._version_view(mv, aliases) for mv in page], _token(page.token)

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

    def _run(self, run_id: str | None):
        from mlflow.exceptions import MlflowException

        if not run_id:
            return None
        try:
            return self.client.get_run(run_id)
        except MlflowException:
            return None  # the run was deleted; the version stands on its own

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
        }

    # -- versions: registration ------------------------------------------------------------
    def _create_version(
        self,
        name: str,
        prepared: F.PreparedModel,
        actor: str,
        *,
        kind: str,
        source_label: str,
        description: str = "",
        tags: dict[str, str] | None = None,
        existing: tuple[str, str, str | None] | None = None,
    ) -> dict[str, Any]:
        """Register ``prepared``: log its directory into a new run of the platform experiment, or
        use ``existing`` = (source, run_id, model_id) when the artifacts already live in MLflow."""
        all_tags = {
            **(tags or {}),
            **prepared.tags,
            TAG_REGISTERED_BY: actor,
            TAG_SOURCE_KIND: kind,
            TAG_SOURCE: source_label[:4000],
        }
        self._ensure_model(name, actor)
        model_id = None
        if existing is None:
            exp_id = self._experiment_id()
            with self._mlflow(f"a run for {name!r}"):
                run = self.client.create_run(
                    exp_id, run_name=f"register-{name}", tags={TAG_REGISTERED_BY: actor, TAG_SOURCE_KIND: kind}
                )
            run_id = run.info.run_id
            try:
                self.client.log_artifacts(run_id, str(prepared.model_dir), artifact_path="model")
                self.client.log_param(run_id, "format", prepared.format)
                self.client.log_param(run_id, "source", source_label[:500])
                for key, value in prepared.metrics.items():
                    self.client.log_metric(run_id, key, value)
                self.client.set_terminated(run_id, "FINISHED")
            except Exception as exc:
                self.client.set_terminated(run_id, "FAILED")
                raise DependencyUnavailable(f"could not store the model's artifacts in MLflow: {exc}") from None
            source = run.info.artifact_uri.rstrip("/") + "/model"
        else:
            source, run_id, model_id = existing
        with self._mlflow(f"a version of {name!r}"):
            mv = self.client.create_model_version(
                name, source=source, run_id=run_id, tags=all_tags, description=description or None, model_id=model_id
            )
        view = self._version_view(self.client.get_model_version(name, str(mv.version)))
        self._audit(actor, "model_version.create", "model_version", f"{name}/{mv.version}", None, view)
        return view

    def register_upload(
        self,
        name: str,
        fmt: str,
        data: bytes,
        actor: str,
        *,
        filename: str = "",
        description: str = "",
        tags: dict | None = None,
        hints: F.Hints | None = None,
    ) -> dict[str, Any]:
        """Register an uploaded file. Checked before anything is stored; pickle-based files
        are stored without being loaded and start untrusted."""
        check_model_name(name)
        F.check_format(fmt)
        user_tags = check_user_tags(tags)
        digest = hashlib.sha256(data).hexdigest()
        label = f"upload:{_safe_label(filename) or F.NATIVE_FILES.get(fmt, 'model.onnx')}"
        with tempfile.TemporaryDirectory(prefix="matih-register-") as tmp:
            prepared = F.prepare(fmt, data, Path(tmp) / "model", self.settings, hints)
            return self._create_version(
                name, prepared, actor, kind="upload", source_label=label, description=description,
                tags={**user_tags, TAG_SHA256: digest},
            )

    def register_from_source(
        self,
        name: str,
        source: str,
        actor: str,
        *,
        fmt: str | None = None,
        description: str = "",
        tags: dict | None = None,
        hints: F.Hints | None = None,
    ) -> dict[str, Any]:
        """Register a file or MLflow model directory inside ``settings.artifact_root``. The path
        is checked (``app.registry.paths``) before anything is read; the artifacts are copied
        into a new run, so later changes at the source do not change the version."""
        import mlflow.artifacts

        check_model_name(name)
        user_tags = check_user_tags(tags)
        location = resolve_source(source, self.settings.artifact_root)
        if fmt is not None:
            F.check_format(fmt)
        with tempfile.TemporaryDirectory(prefix="matih-register-") as tmp:
            if is_object_store(location):
                try:
                    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=location, dst_path=str(Path(tmp) / "src")))
                except Exception as exc:
                    raise NotFound(f"source {source!r} could not be read: {exc}", details={"field": "source"}) from None
            else:
                local = Path(location)
            if local.is_dir():
                copy = Path(tmp) / "model"
                shutil.copytree(local, copy, symlinks=True)  # links are copied as links, then dropped:
                _drop_links(copy)  # nothing a link points at (inside the root or not) is read
                prepared = F.inspect_model_dir(copy, self.settings)
                digest = None
            else:
                if fmt is None:
                    raise InvalidInput(
                        f"source {source!r} is a file; say its format (one of {', '.join(F.FORMATS)})",
                        details={"field": "format"},
                    )
                data = local.read_bytes()
                digest = hashlib.sha256(data).hexdigest()
                prepared = F.prepare(fmt, data, Path(tmp) / "model", self.settings, hints)
            extra = {**user_tags, **({TAG_SHA256: digest} if digest else {})}
            return self._create_version(
                name, prepared, actor, kind="uri", source_label=location, description=description, tags=extra
            )

    def register_from_run(
        self,
        name: str,
        run_id: str,
        actor: str,
        *,
        artifact_path: str = "model",
        description: str = "",
        tags: dict | None = None,
        job_id: str | None = None,
    ) -> dict[str, Any]:
        """Register an MLflow model a run logged: under the run's artifacts
        (``runs:/<run>/<artifact_path>``) or, for MLflow 3 logged models, the run's logged model
        named ``artifact_path``. The version points at those artifacts; nothing is copied."""
        import mlflow.artifacts

        check_model_name(name)
        user_tags = check_user_tags(tags)
        artifact_path = check_relative_path(artifact_path)
        if not re.fullmatch(r"[A-Za-z0-9_.\-/]{1,256}", artifact_path):  # it goes into an MLflow filter string
            raise InvalidInput(
                f"artifact_path {artifact_path!r} may hold only letters, digits, '_', '.', '-' and '/'",
                details={"field": "artifact_path"},
            )
        if not re.fullmatch(r"[0-9a-fA-F]{8,64}", run_id or ""):
            raise InvalidInput(f"run_id {run_id!r} is not an MLflow run id", details={"field": "run_id"})
        with self._mlflow(f"run {run_id!r}", "GET /v1/experiments/{id}/runs lists runs"):
            run = self.client.get_run(run_id)
        source, model_id = self._run_model_source(run, artifact_path)
        with tempfile.TemporaryDirectory(prefix="matih-register-") as tmp:
            try:
                local = Path(mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp))
            except Exception as exc:
                raise DependencyUnavailable(f"could not read {source} from MLflow: {exc}") from None
            prepared = F.inspect_model_dir(local, self.settings)
        extra = dict(user_tags)
        run_tags = dict(run.data.tags)
        job = job_id or run_tags.get(TAG_JOB)
        if job:
            extra[TAG_JOB] = job
        if "dataset" in run.data.params:
            extra[TAG_DATASET_URI] = run.data.params["dataset"]
        kind = "job" if job_id else "run"
        return self._create_version(
            name, prepared, actor, kind=kind, source_label=f"runs:/{run_id}/{artifact_path}", description=description,
            tags=extra, existing=(source, run_id, model_id),
        )

    def _run_model_source(self, run, artifact_path: str) -> tuple[str, str | None]:
        """MLflow 3 logs models as logged models (``models:/m-...``) whose files the client also
        lists under the run; those come first. Otherwise the run's own artifacts."""
        run_id = run.info.run_id
        with self._mlflow(f"models of run {run_id}"):
            logged = self.client.search_logged_models(
                [run.info.experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{artifact_path}'"
            )
        if logged:
            return f"models:/{logged[0].model_id}", logged[0].model_id
        with self._mlflow(f"artifacts of run {run_id}"):
            names = {Path(a.path).name for a in self.client.list_artifacts(run_id, artifact_path)}
        if "MLmodel" in names:
            return run.info.artifact_uri.rstrip("/") + "/" + artifact_path, None
        raise NotFound(
            f"run {run_id} has no MLflow model at {artifact_path!r} (neither run artifacts nor a logged model of "
            "that name); give the artifact_path the model was logged under",
            details={"field": "artifact_path"},
        )

    def register_from_job(self, name: str, job_id: str, actor: str, **kwargs: Any) -> dict[str, Any]:
        if self.store is None:
            raise NotFound("no metadata store to look the job up in")
        job = self.store.get_job(job_id)
        run_id = (job.get("result") or {}).get("run_id")
        if job["status"] != "succeeded" or not run_id:
            raise Conflict(
                f"job {job_id} is {job['status']} and has no run to register; wait for it to succeed",
                details={"job_id": job_id},
            )
        return self.register_from_run(name, run_id, actor, job_id=job_id, **kwargs)

    # -- versions: changes -----------------------------------------------------------------
    def _set_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        with self._mlflow(f"version {version} of {name!r}"):
            for key, value in tags.items():
                self.client.set_model_version_tag(name, version, key, value)

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

    def set_alias(self, name: str, alias: str, version: str | int, actor: str) -> dict[str, Any]:
        check_alias(alias)
        if alias.lower() in STAGE_ALIASES:
            raise Conflict(
                f"alias {alias!r} is a stage and follows the stage rules; use POST /v1/models/{name}/versions/"
                f"{{v}}/stage with {{\"stage\": \"{alias.lower()}\"}}",
                details={"alias": alias},
            )
        mv = self._mv(name, version)
        if (mv.tags or {}).get(TAG_STAGE) == "archived":
            raise Conflict(
                f"version {mv.version} of {name!r} is archived and takes no aliases; move it to staging first",
                details={"version": str(mv.version)},
            )
        before = self.get_model(name)["aliases"].get(alias)
        with self._mlflow(f"alias {alias!r} of {name!r}"):
            self.client.set_registered_model_alias(name, alias, str(mv.version))
        self._audit(actor, "model.alias.set", "model", name, {alias: before}, {alias: str(mv.version)})
        return {"name": name, "alias": alias, "version": str(mv.version), "previous_version": before}

    def delete_alias(self, name: str, alias: str, actor: str) -> None:
        check_alias(alias)
        if alias.lower() in STAGE_ALIASES:
            raise Conflict(
                f"alias {alias!r} is a stage; move the version to another stage (POST .../stage) instead",
                details={"alias": alias},
            )
        before = self.get_model(name)["aliases"].get(alias)
        if before is None:
            raise NotFound(f"model {name!r} has no alias {alias!r}; GET /v1/models/{name} shows its aliases")
        with self._mlflow(f"alias {alias!r} of {name!r}"):
            self.client.delete_registered_model_alias(name, alias)
        self._audit(actor, "model.alias.delete", "model", name, {alias: before}, None)

    def set_stage(
        self, name: str, version: str | int, stage: str, actor: str, archive_existing: bool = False
    ) -> dict[str, Any]:
        if stage not in STAGES:
            raise InvalidInput(f"stage {stage!r} is not one of {', '.join(STAGES)}", details={"field": "stage"})
        mv = self._mv(name, version)
        version = str(mv.version)
        tags = dict(mv.tags or {})
        current = tags.get(TAG_STAGE, "none")
        rm = self._rm(name)
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        before = {"stage": current, "aliases": sorted(a for a, v in aliases.items() if v == version)}
        if stage == "production":
            self._check_production(name, version, tags, current)
        if stage == "archived":
            with self._mlflow(f"aliases of {name!r}"):
                for alias, held in aliases.items():
                    if held == version:
                        self.client.delete_registered_model_alias(name, alias)
        else:
            if current == "archived" and stage == "production":  # _check_production says so; belt and braces
                raise Conflict(f"version {version} of {name!r} is archived; move it to staging first")
            previous = aliases.get(stage)
            if previous and previous != version:
                self._leave_stage(name, previous, stage, actor, archive_existing)
            with self._mlflow(f"alias {stage!r} of {name!r}"):
                self.client.set_registered_model_alias(name, stage, version)
                other = "staging" if stage == "production" else "production"
                if aliases.get(other) == version:
                    self.client.delete_registered_model_alias(name, other)
        self._set_tags(name, version, {TAG_STAGE: stage})
        after_mv = self._mv(name, version)
        view = self._version_view(after_mv)
        self._audit(actor, f"model_version.stage.{stage}", "model_version", f"{name}/{version}", before,
                    {"stage": stage, "aliases": view["aliases"]})
        return view

    def _check_production(self, name: str, version: str, tags: dict[str, str], current: str) -> None:
        base = f"/v1/models/{name}/versions/{version}"
        if current == "archived":
            raise Conflict(
                f"version {version} of {name!r} is archived; move it to staging first (POST {base}/stage)",
                code="illegal_transition", details={"missing": ["restore to staging"]},
            )
        missing = []
        rules = self.settings.registry
        if rules.production_requires_validation and tags.get(TAG_VALIDATION) != "passed":
            missing.append(
                f"a passed validation (matih.validation is {tags.get(TAG_VALIDATION, 'unset')}: train it through a "
                "job, or register a format whose ONNX conversion passes parity, or POST "
                f"{base}/convert)"
            )
        if rules.production_requires_approval and not tags.get(TAG_APPROVED_BY):
            missing.append(f"an admin's approval (POST {base}/approve)")
        if tags.get(TAG_FORMAT) in F.PICKLE_FORMATS and "onnx" not in json.loads(tags.get(TAG_FORMATS, "[]")) \
                and tags.get(TAG_TRUSTED) != "true":
            missing.append(f"trust, since it is pickle-based (an admin's POST {base}/trust)")
        if missing:
            raise Conflict(
                f"version {version} of {name!r} cannot move to production; missing: " + "; ".join(missing),
                code="illegal_transition",
                details={"missing": missing},
            )

    def _leave_stage(self, name: str, version: str, stage: str, actor: str, archive: bool) -> None:
        """The version that held ``stage`` loses it (or is archived with ``archive``)."""
        mv = self._mv(name, version)
        if archive:
            self.set_stage(name, version, "archived", actor)
            return
        if (mv.tags or {}).get(TAG_STAGE) == stage:
            with self._mlflow(f"version {version} of {name!r}"):
                self.client.delete_model_version_tag(name, version, TAG_STAGE)
            self._audit(actor, "model_version.stage.none", "model_version", f"{name}/{version}",
                        {"stage": stage}, {"stage": "none"})

    def approve(self, name: str, version: str | int, actor: str, comment: str = "") -> dict[str, Any]:
        mv = self._mv(name, version)
        version = str(mv.version)
        if (mv.tags or {}).get(TAG_STAGE) == "archived":
            raise Conflict(f"version {version} of {name!r} is archived; move it to staging before approving it")
        before = {"approved_by": (mv.tags or {}).get(TAG_APPROVED_BY)}
        tags = {TAG_APPROVED_BY: actor, TAG_APPROVED_AT: _now()}
        if comment:
            tags[TAG_APPROVAL_COMMENT] = comment[:4000]
        self._set_tags(name, version, tags)
        view = self._version_view(self._mv(name, version))
        self._audit(actor, "model_version.approve", "model_version", f"{name}/{version}", before,
                    {"approved_by": actor, "comment": comment})
        return view

    def trust(self, name: str, version: str | int, actor: str) -> dict[str, Any]:
        """Mark a pickle-based version trusted: from now on the native runtime may unpickle it and
        ``convert`` may load it. Only for pickle-based versions; the admin vouches for the file."""
        mv = self._mv(name, version)
        version = str(mv.version)
        tags = dict(mv.tags or {})
        fmt = tags.get(TAG_FORMAT, "onnx")
        if fmt not in F.PICKLE_FORMATS:
            raise Conflict(
                f"version {version} of {name!r} is {fmt}, which loads without executing code; only pickle-based "
                "versions (sklearn-pickle) need trust",
                details={"format": fmt},
            )
        before = {"trusted": tags.get(TAG_TRUSTED) == "true"}
        self._set_tags(name, version, {TAG_TRUSTED: "true", TAG_TRUSTED_BY: actor, TAG_TRUSTED_AT: _now()})
        view = self._version_view(self._mv(name, version))
        self._audit(actor, "model_version.trust", "model_version", f"{name}/{version}", before, {"trusted": True})
        return view

    def convert(self, name: str, version: str | int, actor: str) -> dict[str, Any]:
        """A new ONNX version from a native one (skops, torchscript, or a *trusted* pickle),
        with parity on generated rows; the source version is unchanged."""
        mv = self._mv(name, version)
        version = str(mv.version)
        tags = dict(mv.tags or {})
        resolved = ResolvedModel(name, version, tags)
        meta = model_metadata(resolved)
        if meta["format"] == "onnx":
            raise Conflict(f"version {version} of {name!r} is ONNX already", details={"format": "onnx"})
        if meta["format"] in F.PICKLE_FORMATS and not meta["trusted"]:
            raise Conflict(
                f"version {version} of {name!r} is pickle-based and not trusted, so it is never loaded; an admin "
                f"may POST /v1/models/{name}/versions/{version}/trust after reviewing it",
                code="untrusted_model",
            )
        with tempfile.TemporaryDirectory(prefix="matih-convert-") as tmp:
            src = self.registry.download_to(resolved, Path(tmp) / "src")
            native = F.load_native(src, meta)
            dest = Path(tmp) / "model"
            hints = F.Hints(
                feature_names=meta["feature_names"], classes=meta["classes"], task=meta["task"],
                n_features=native.n_features,
            )
            if native.format == "torchscript":
                _fmt, path, _conf = F.native_entry(src)
                prepared = F.prepare_torchscript(path.read_bytes(), dest, self.settings, hints)
                if "onnx" not in prepared.formats:
                    raise Conflict(
                        f"version {version} of {name!r} cannot become ONNX: "
                        f"{prepared.tags.get(F.TAG_CONVERSION_ERROR)}; keep serving it with runtime 'native'"
                    )
            else:
                prepared = F.prepare_sklearn_estimator(native.model, dest, self.settings, hints)
            prepared = F.PreparedModel(prepared.model_dir, "onnx", ["onnx"], prepared.tags, prepared.metrics)
            prepared.tags.update({TAG_FORMAT: "onnx", TAG_FORMATS: json.dumps(["onnx"])})
            prepared.tags.pop(TAG_TRUSTED, None)
            carried = {k: tags[k] for k in _LINEAGE_TAGS if k in tags and k not in prepared.tags}
            return self._create_version(
                name, prepared, actor, kind="conversion", source_label=f"models:/{name}/{version}",
                description=mv.description or "", tags={**carried, TAG_CONVERTED_FROM: version},
            )

    # -- cards and comparison --------------------------------------------------------------
    def card(self, name: str, version: str | int) -> dict[str, Any]:
        v = self.get_version(name, version)
        tags = v["tags"]
        approvals = []
        if tags.get(TAG_APPROVED_BY):
            approvals.append(
                {"by": tags[TAG_APPROVED_BY], "at": tags.get(TAG_APPROVED_AT), "comment": tags.get(TAG_APPROVAL_COMMENT, "")}
            )
        parity = tags.get(TAG_PARITY)
        return {
            "name": v["name"],
            "version": v["version"],
            "description": v["description"],
            "intended_use": v["intended_use"],
            "task": v["task"],
            "metrics": v["metrics"],
            "params": v["params"],
            "data": {
                "dataset_uri": v["lineage"]["dataset_uri"],
                "dataset_sha256": v["lineage"]["dataset_sha256"],
                "feature_names": v["feature_names"],
                "classes": v["classes"],
            },
            "signature": v["signature"],
            "lineage": v["lineage"],
            "format": v["format"],
            "formats": v["formats"],
            "parity": {
                "onnx_max_abs_diff": float(parity) if parity else None,
                "validation": v["validation"],
                "detail": tags.get(F.TAG_VALIDATION_DETAIL),
            },
            "validation": json.loads(tags[TAG_VALIDATION_REPORT]) if TAG_VALIDATION_REPORT in tags else None,
            "stage": v["stage"],
            "aliases": v["aliases"],
            "approvals": approvals,
            "trusted": v["trusted"],
            "trusted_by": tags.get(TAG_TRUSTED_BY),
        }

    def compare(self, name: str, versions: list[str]) -> dict[str, Any]:
        if not 2 <= len(versions) <= 10:
            raise InvalidInput(
                f"compare takes 2 to 10 versions (got {len(versions)}): ?versions=1,2", details={"field": "versions"}
            )
        versions = [check_version(v) for v in versions]
        rows = [self.get_version(name, v, detail=False) for v in versions]
        runs = {r["version"]: self._run(r["run_id"]) for r in rows}
        metrics: dict[str, dict[str, float | None]] = {}
        params: dict[str, dict[str, str | None]] = {}
        for r in rows:
            run = runs[r["version"]]
            for k, val in (run.data.metrics if run else {}).items():
                metrics.setdefault(k, {})[r["version"]] = val
            for k, val in (run.data.params if run else {}).items():
                params.setdefault(k, {})[r["version"]] = val
        for table in (metrics, params):
            for values in table.values():
                for v in versions:
                    values.setdefault(v, None)
        return {
            "name": name,
            "versions": versions,
            "metrics": dict(sorted(metrics.items())),
            "params": dict(sorted(params.items())),
            "differing_params": sorted(k for k, vals in params.items() if len(set(vals.values())) > 1),
            "summary": {
                r["version"]: {k: r[k] for k in ("format", "stage", "validation", "aliases", "approved_by", "run_id")}
                for r in rows
            },
        }

    # -- tracking --------------------------------------------------------------------------
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
                [experiment_id], max_results=limit, page_token=mlflow_page_token(page_token),
                order_by=["attributes.start_time DESC"],
            )
        return [self._run_view(r) for r in page], _token(page.token)

    def get_run(self, run_id: str) -> dict[str, Any]:
        if not re.fullmatch(r"[0-9A-Za-z_-]{1,64}", run_id):
            raise InvalidInput(f"run id {run_id!r} is not an MLflow run id")
        with self._mlflow(f"run {run_id!r}"):
            return self._run_view(self.client.get_run(run_id))


def card_markdown(card: dict[str, Any]) -> str:
    """The model card as Markdown, for people and for the MLflow version description."""
    lines = [f"# {card['name']} version {card['version']}", ""]
    if card["description"]:
        lines += [card["description"], ""]
    lines += ["## Intended use", "", card["intended_use"] or "_not stated_", ""]
    lines += ["## Metrics", ""]
    lines += [f"- {k}: {v:.6g}" for k, v in sorted(card["metrics"].items())] or ["_none recorded_"]
    lines += ["", "## Parameters", ""]
    lines += [f"- {k}: {v}" for k, v in sorted(card["params"].items())] or ["_none recorded_"]
    data = card["data"]
    lines += ["", "## Data", "", f"- dataset: {data['dataset_uri'] or 'unknown'}",
              f"- sha256: {data['dataset_sha256'] or 'unknown'}"]
    lin = card["lineage"]
    lines += ["", "## Lineage", ""] + [f"- {k}: {v}" for k, v in lin.items() if v]
    parity = card["parity"]
    lines += ["", "## Format and validation", "", f"- format: {card['format']} (artifacts: {', '.join(card['formats'])})",
              f"- validation: {parity['validation']}" + (f" ({parity['detail']})" if parity["detail"] else "")]
    report = card.get("validation")
    if report:
        champ = report.get("champion") or {}
        lines += ["", "## Validation gates", "",
                  f"- holdout: {', '.join(f'{k} {v:.4g}' for k, v in (report.get('metrics') or {}).items())}",
                  f"- compared with: version {champ['version']}" if champ else "- compared with: no champion"]
        lines += [f"- {g['metric']} {g['rule']}: {'passed' if g['passed'] else 'FAILED'} ({g['note']})"
                  for g in report.get("gates") or []]
    lines += ["", "## Stage and approvals", "", f"- stage: {card['stage']}",
              f"- aliases: {', '.join(card['aliases']) or 'none'}"]
    lines += [f"- approved by {a['by']} at {a['at']}" + (f": {a['comment']}" if a["comment"] else "")
              for a in card["approvals"]] or ["- not approved"]
    return "\n".join(lines) + "\n"


def _safe_label(filename: str) -> str:
    """An uploaded file's name for display only (never a path): its last segment, printable."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:200]


def _drop_links(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_symlink():
            path.unlink()


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
