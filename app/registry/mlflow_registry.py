"""The model registry is MLflow: this module resolves references and fetches artifacts.

Nothing is copied out of MLflow: versions, aliases and tags live there and are visible in
MLflow's own UI and client. Tags written by the platform start with ``matih.``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cachetools import TTLCache

from app.errors import Conflict, DependencyUnavailable, MatihError, NotFound, RegistryForbidden, RegistryRejected
from app.registry.targets import ModelRef, model_name_of, parse_target
from app.settings import Settings
from app.storage.s3 import configure_s3_env

TAG_FORMAT = "matih.format"
TAG_JOB = "matih.job_id"
TAG_PARITY = "matih.onnx_max_abs_diff"
TAG_FEATURES = "matih.feature_names"
TAG_TASK = "matih.task"
TAG_CLASSES = "matih.classes"
TAG_STAGE = "matih.stage"  # staging | production | archived
TAG_TRUSTED = "matih.trusted"  # mirrors the metadata store's trust record, for MLflow readers; never decides
TAG_FORMATS = "matih.formats"  # JSON list of the formats the version's artifacts hold, e.g. ["onnx", "skops"]
TAG_VALIDATION = "matih.validation"  # passed | failed: the ONNX parity (or ONNX check) at training or registration
TAG_VALIDATION_REPORT = "matih.validation_report"  # JSON: holdout metrics, champion's, each gate's outcome
TAG_APPROVED_BY = "matih.approved_by"  # the admin who approved the version for production
TAG_DATASET_URI = "matih.dataset_uri"
TAG_DATASET_SHA256 = "matih.dataset_sha256"  # sha256 of the training frame
TAG_FEATURE_SERVICE = "matih.feature_service"  # JSON: the Feast feature service of a feast:// dataset (app.features.jobs)
TAG_CODE_VERSION = "matih.code_version"  # git commit of the code that trained it, else the package version


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    version: str
    tags: dict[str, str] = field(default_factory=dict)
    # sha256 of the pickle-based file an admin trusted, from the metadata store (never from a tag)
    trusted_sha256: str | None = None

    @property
    def model_id(self) -> str:
        """The multiplexed model id a ModelServer replica loads: ``name/version``."""
        return f"{self.name}/{self.version}"


def configure_mlflow_client(timeout_s: int, retries: int) -> None:
    """MLflow's HTTP client reads these per request; they hold for this whole process."""
    os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] = str(timeout_s)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = str(retries)
    os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"] = "1"
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # no bars in replica logs


def _is_unavailable(exc: Exception) -> bool:
    from mlflow.exceptions import MlflowException

    if isinstance(exc, MlflowException):
        code = getattr(exc, "error_code", "")
        return code in ("TEMPORARILY_UNAVAILABLE", "INTERNAL_ERROR", "ENDPOINT_NOT_FOUND") and "not found" not in str(
            exc
        ).lower()
    return isinstance(exc, (ConnectionError, OSError, TimeoutError))


_NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")
# MLflow answers a missing alias with its 400 (INVALID_PARAMETER_VALUE); that one is a 404.
_MISSING_ALIAS = re.compile(r"Registered model alias \S+ not found")
_EXISTS_CODES = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS", "RESOURCE_CONFLICT", "INVALID_STATE", "ABORTED")


def mlflow_error(exc: Exception, what: str, fix: str = "") -> MatihError:
    """One of our errors for an error MLflow raised about ``what``: unknown -> NotFound,
    exists (or a state that forbids it) -> Conflict, MLflow's 400 -> RegistryRejected, its
    401/403 -> RegistryForbidden (the platform's MLflow identity, not the caller), anything
    else -> DependencyUnavailable. By MLflow's error code first; the message decides only
    for codes that say nothing (a local store's INTERNAL_ERROR "... not found")."""
    from mlflow.exceptions import MlflowException

    hint = f"; {fix}" if fix else ""
    if not isinstance(exc, MlflowException):
        return DependencyUnavailable(f"MLflow is unavailable: {exc}")
    code = getattr(exc, "error_code", "") or ""
    msg = getattr(exc, "message", str(exc))
    status = exc.get_http_status_code()
    if code in _NOT_FOUND_CODES or _MISSING_ALIAS.search(msg):
        return NotFound(f"{what} does not exist{hint}")
    if code in _EXISTS_CODES:
        if code in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS") or "already exists" in msg.lower():
            return Conflict(f"{what} exists already{hint}")
        return Conflict(f"MLflow refused the change to {what}: {msg}")
    if status in (401, 403):
        return RegistryForbidden(
            f"MLflow refused the platform access to {what} (HTTP {status}: {msg}); an operator must grant the "
            "platform's MLflow user that permission",
            details={"mlflow_error_code": code},
        )
    if status == 400:
        return RegistryRejected(f"MLflow refused {what}: {msg}", details={"mlflow_error_code": code})
    if code not in ("ENDPOINT_NOT_FOUND", "TEMPORARILY_UNAVAILABLE") and (
        "not found" in msg.lower() or "does not exist" in msg.lower()
    ):
        return NotFound(f"{what} does not exist{hint}")
    return DependencyUnavailable(f"MLflow failed on {what}: {msg}")


class ModelRegistry:
    """Resolves ``name@alias`` / ``name/version`` through MLflow, with a short TTL cache, and
    downloads version artifacts into a local cache keyed by ``name/version``."""

    def __init__(self, settings: Settings, *, serving: bool = False):
        """``serving=True`` (gateway, registry cache): short timeouts and no retries, because
        the caller has a last known good answer to fall back on; otherwise the settings'
        timeout and retries with backoff."""
        if serving:
            configure_mlflow_client(settings.serving.mlflow_timeout_s, retries=0)
        else:
            configure_mlflow_client(settings.mlflow_request_timeout_s, settings.mlflow_request_retries)
        configure_s3_env(settings)  # MLflow reads S3 endpoint and keys from the environment
        import mlflow
        from mlflow import MlflowClient

        self.settings = settings
        self.tracking_uri = settings.mlflow_tracking_uri
        mlflow.set_tracking_uri(self.tracking_uri)
        mlflow.set_registry_uri(self.tracking_uri)
        self.client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        self._cache: TTLCache = TTLCache(maxsize=4096, ttl=settings.serving.resolve_ttl_s)
        self._lock = threading.Lock()  # cachetools caches are not thread-safe
        self.cache_dir = settings.matih_home / "model_cache"

    # -- resolution ------------------------------------------------------------------------
    def resolve(self, target: str | ModelRef, *, use_cache: bool = True) -> ResolvedModel:
        ref = parse_target(target) if isinstance(target, str) else target
        key = str(ref)
        if use_cache:
            with self._lock:
                hit = self._cache.get(key)
            if hit is not None:
                return hit
        resolved = self._resolve_uncached(ref)
        with self._lock:
            self._cache[key] = resolved
        return resolved

    def invalidate(self, name: str | None = None) -> None:
        with self._lock:
            if name is None:
                self._cache.clear()
            else:
                for key in [k for k in list(self._cache.keys()) if model_name_of(k) == name]:
                    self._cache.pop(key, None)

    def _resolve_uncached(self, ref: ModelRef) -> ResolvedModel:
        from mlflow.exceptions import MlflowException

        try:
            if ref.alias:
                mv = self.client.get_model_version_by_alias(ref.name, ref.alias)
            else:
                mv = self.client.get_model_version(ref.name, ref.version)
        except MlflowException as exc:
            if _is_unavailable(exc):
                raise DependencyUnavailable(f"MLflow is unavailable at {self.tracking_uri}: {exc}") from None
            err = mlflow_error(exc, f"model {ref}")
            if isinstance(err, (RegistryForbidden, RegistryRejected)):
                raise err from None
            raise NotFound(
                f"model {ref} is not in the registry; register a version first "
                "(POST /v1/training/jobs with register_as) or fix the endpoint's target",
                details={"target": str(ref)},
            ) from None
        except Exception as exc:  # connection refused, DNS, timeouts
            raise DependencyUnavailable(f"MLflow is unavailable at {self.tracking_uri}: {exc}") from None
        return ResolvedModel(mv.name, str(mv.version), dict(mv.tags or {}))

    def ping(self) -> None:
        try:
            self.client.search_registered_models(max_results=1)
        except Exception as exc:
            raise DependencyUnavailable(f"MLflow is unavailable at {self.tracking_uri}: {exc}") from None

    # -- artifacts -------------------------------------------------------------------------
    def download_to(self, model: ResolvedModel, dest: Path) -> Path:
        """Download the version's MLflow model into the empty directory ``dest``."""
        import mlflow.artifacts

        try:
            mlflow.artifacts.download_artifacts(
                artifact_uri=f"models:/{model.name}/{model.version}",
                dst_path=str(dest),
                tracking_uri=self.tracking_uri,
                registry_uri=self.tracking_uri,
            )
        except Exception as exc:
            raise DependencyUnavailable(f"could not download {model.model_id} from MLflow: {exc}") from None
        return dest

    def download(self, model: ResolvedModel) -> Path:
        """Local directory of the version's MLflow model, downloaded once per machine into
        MATIH_HOME/model_cache (versions are immutable, so the copy never goes stale)."""
        dest = self.cache_dir / model.name / model.version
        if (dest / "MLmodel").exists():
            return dest
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{model.version}-", dir=dest.parent))
        try:
            self.download_to(model, tmp)
            try:
                os.rename(tmp, dest)  # atomic: another process may have won the race
            except OSError:
                if not (dest / "MLmodel").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return dest


def ensure_experiment(client, settings: Settings) -> str:
    """Id of the platform's experiment, created with its artifact location under
    ``settings.artifact_root`` on first use (safe when several processes race)."""
    from mlflow.exceptions import MlflowException

    exp = client.get_experiment_by_name(settings.experiment_name)
    if exp is not None:
        return exp.experiment_id
    location = settings.artifact_root.rstrip("/") + "/" + settings.experiment_name
    try:
        return client.create_experiment(settings.experiment_name, artifact_location=location)
    except MlflowException:  # created meanwhile by another process
        return client.get_experiment_by_name(settings.experiment_name).experiment_id


def check_servable(model: ResolvedModel) -> None:
    """Archived versions are never served; the caller gets 409 naming the version."""
    if model.tags.get(TAG_STAGE) == "archived":
        raise Conflict(
            f"model {model.model_id} is archived and cannot be served; point the endpoint at another version",
            details={"model": model.name, "version": model.version},
        )


def model_metadata(model: ResolvedModel) -> dict[str, Any]:
    """The serving-relevant tags of a version, decoded."""
    tags = model.tags
    fmt = tags.get(TAG_FORMAT, "onnx")
    return {
        "model": model.model_id,
        "format": fmt,
        "formats": json.loads(tags[TAG_FORMATS]) if TAG_FORMATS in tags else [fmt],
        "trusted": model.trusted_sha256 is not None,  # the store's record; the matih.trusted tag only mirrors it
        "trusted_sha256": model.trusted_sha256,
        "task": tags.get(TAG_TASK),
        "feature_names": json.loads(tags[TAG_FEATURES]) if TAG_FEATURES in tags else None,
        "classes": json.loads(tags[TAG_CLASSES]) if TAG_CLASSES in tags else None,
        "tags": dict(tags),
    }
