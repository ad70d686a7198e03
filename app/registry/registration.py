"""Registering versions: from an upload, a path under the artifact root, an MLflow run, a
finished training job, or an ONNX conversion of another version. Every one goes through
``RegistrationMixin._create_version``, the single place a model version is created."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from app.errors import Conflict, DependencyUnavailable, InvalidInput, NotFound
from app.registry import formats as F
from app.registry.base import (
    TAG_CONVERTED_FROM,
    TAG_REGISTERED_BY,
    TAG_SHA256,
    TAG_SOURCE,
    TAG_SOURCE_KIND,
    RegistryBase,
)
from app.registry.checks import check_model_name, check_user_tags
from app.registry.mlflow_registry import (
    TAG_CLASSES,
    TAG_CODE_VERSION,
    TAG_DATASET_SHA256,
    TAG_DATASET_URI,
    TAG_FEATURES,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_JOB,
    TAG_TASK,
    TAG_TRUSTED,
    ResolvedModel,
    model_metadata,
)
from app.registry.outbox import OP_CREATE, TAG_OP
from app.registry.paths import check_relative_path, check_run_source, is_object_store, resolve_source

_LINEAGE_TAGS = (TAG_JOB, TAG_DATASET_URI, TAG_DATASET_SHA256, TAG_CODE_VERSION, TAG_TASK, TAG_FEATURES, TAG_CLASSES)


class RegistrationMixin(RegistryBase):
    """Every way a version comes to be; all go through ``_create_version``."""

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
        use ``existing`` = (source, run_id, model_id) when the artifacts already live in MLflow.
        Through the outbox (``app/registry/outbox.py``): the intent, then ONE
        ``create_model_version`` carrying every tag, then the completion with its audit record."""
        all_tags = {
            **(tags or {}),
            **prepared.tags,
            TAG_REGISTERED_BY: actor,
            TAG_SOURCE_KIND: kind,
            TAG_SOURCE: source_label[:4000],
        }
        op_id, nonce = self._begin_op(OP_CREATE, name, actor, {"kind": kind, "source": source_label[:500]})
        if nonce:
            all_tags[TAG_OP] = nonce  # set with every other tag: recovery finds the version by it
        sent = False  # whether create_model_version went out (MLflow may have made the version)
        try:
            self._ensure_model(name, actor)
            source, run_id, model_id = existing if existing is not None else self._log_model_dir(
                name, prepared, actor, kind, source_label)
            sent = True
            with self._mlflow(f"a version of {name!r}"):
                mv = self.client.create_model_version(
                    name, source=source, run_id=run_id, tags=all_tags, description=description or None,
                    model_id=model_id,
                )
            view = self._version_view(self.client.get_model_version(name, str(mv.version)))
        except BaseException as exc:
            if not (sent and isinstance(exc, DependencyUnavailable)):
                self._finish_op(op_id, "rolled_back", error=getattr(exc, "message", None) or type(exc).__name__)
            raise  # else left pending: recovery looks for the version by the nonce
        self._finish_op(op_id, "done", version=str(mv.version),
                        audit=("model_version.create", "model_version", f"{name}/{mv.version}", None, view))
        return view

    def _log_model_dir(
        self, name: str, prepared: F.PreparedModel, actor: str, kind: str, source_label: str
    ) -> tuple[str, str, None]:
        """Log ``prepared``'s directory into a new run of the platform experiment: (source, run id, None)."""
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
        return run.info.artifact_uri.rstrip("/") + "/model", run_id, None

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
        check_run_source(self.client, source, self.settings.artifact_root)  # nothing is read from outside it
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

    def convert(self, name: str, version: str | int, actor: str) -> dict[str, Any]:
        """A new ONNX version from a native one (skops, torchscript, or a *trusted* pickle),
        with parity on generated rows; the source version is unchanged."""
        mv = self._mv(name, version)
        version = str(mv.version)
        tags = dict(mv.tags or {})
        record = self.store.get_trust(name, version) if self.store is not None else None
        resolved = ResolvedModel(name, version, tags, record["sha256"] if record else None)
        meta = model_metadata(resolved)  # load_native unpickles only bytes hashing to the trusted digest
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


def _safe_label(filename: str) -> str:
    """An uploaded file's name for display only (never a path): its last segment, printable."""
    base = (filename or "").replace("\\", "/").rsplit("/", 1)[-1]
    return "".join(ch for ch in base if ch.isprintable())[:200]


def _drop_links(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_symlink():
            path.unlink()

