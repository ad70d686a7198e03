"""What ``/v1/ensembles`` does, as plain Python over the registry (the HTTP layer,
``app/api/ensembles.py``, adds roles, the job queue and the offload to a Ray task).

An ensemble is a registered model tagged ``matih.kind=ensemble``; its versions carry the
pinned definition (``matih.ensemble``) and the holdout report (``matih.ensemble_report``), so
every read here comes from MLflow's tags, with no download.
"""

from __future__ import annotations

import json
from typing import Any

from app.ensembles.definition import DEFINITION_TAG, KIND_TAG
from app.ensembles.registry import ENSEMBLE_KIND, TAG_REPORT, pin_definition, publish
from app.ensembles.spec import EnsembleSpec, check_ensemble_spec
from app.errors import InvalidInput, NotFound
from app.pagination import mlflow_page_token
from app.registry.checks import check_model_name
from app.registry.mlflow_registry import TAG_STAGE, mlflow_error


def check_and_pin(spec: EnsembleSpec, settings, registry):
    """(the spec with its paths made canonical, the pinned definition or None for bagging and
    boosting, which have no registered members): every 422 the request deserves, before
    anything is stored or queued."""
    spec = check_ensemble_spec(spec, settings)
    if spec.dataset is not None:
        _check_builtin(spec.dataset.uri)
    defn = pin_definition(registry, settings, spec) if spec.members else None
    return spec, defn


def _check_builtin(uri: str) -> None:
    from app.datasets import builtin_names

    if uri.startswith("builtin://") and uri[len("builtin://"):] not in builtin_names():
        raise InvalidInput(
            f"dataset {uri!r} is not built in; use one of {', '.join('builtin://' + n for n in builtin_names())}",
            details={"field": "dataset.uri"},
        )


def create_ensemble(settings, registry, store, spec_json: dict[str, Any], actor: str) -> dict[str, Any]:
    """Create (or find) a version of a voting or averaging ensemble: pin, check, score on the
    dataset when given, publish. Called in a thread by the API, or in a Ray task by the
    Gateway's registry offload (``app.ensembles.service:create_ensemble``), since it loads and
    runs ONNX models. Failing gates are a 422 ``validation_failed`` with the result."""
    from app.training.pipeline import ValidationFailed

    spec = EnsembleSpec.model_validate(spec_json)
    if spec.trained:
        raise InvalidInput(f"method {spec.method!r} is trained by a job (POST /v1/ensembles queues it)",
                           details={"field": "method"})
    spec, defn = check_and_pin(spec, settings, registry)
    data = None
    if spec.dataset is not None:
        from app.training.data import prepare_data

        d = spec.dataset
        data = prepare_data(d.uri, d.target, d.features, d.split.test_size, d.split.seed, task=spec.task,
                            settings=settings)
    try:
        return publish(registry, settings, defn, data=data, validation=spec.validation, fuse=spec.fuse,
                       actor=actor, store=store)
    except ValidationFailed as exc:
        raise InvalidInput(exc.message, code="validation_failed", details=exc.details) from None


class EnsembleService:
    """Reads of ensembles: the list, and one ensemble with its versions."""

    def __init__(self, settings, registry, store=None):
        self.settings, self.registry, self.store = settings, registry, store
        self.client = registry.client

    def _call(self, what: str, fn, *args, **kwargs):
        from mlflow.exceptions import MlflowException

        try:
            return fn(*args, **kwargs)
        except MlflowException as exc:
            raise mlflow_error(exc, what) from None

    def list(self, limit: int = 50, page_token: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        page = self._call("the ensembles", self.client.search_registered_models,
                          filter_string=f"tags.`{KIND_TAG}` = '{ENSEMBLE_KIND}'", max_results=limit,
                          page_token=mlflow_page_token(page_token), order_by=["name ASC"])
        items = []
        for rm in page:
            aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
            latest = max((int(v.version) for v in (rm.latest_versions or [])), default=None)
            items.append({"name": rm.name, "description": rm.description or "", "aliases": aliases,
                          "latest_version": str(latest) if latest else None})
        tok = page.token
        return items, (tok.decode() if isinstance(tok, bytes) else tok) or None

    def get(self, name: str) -> dict[str, Any]:
        """The ensemble: the definition of its champion (else its latest version), and every
        version with its pins, holdout metrics and whether it beats its best member."""
        check_model_name(name)
        rm = self._call(f"ensemble {name!r}", self.client.get_registered_model, name)
        if (rm.tags or {}).get(KIND_TAG) != ENSEMBLE_KIND:
            raise NotFound(f"model {name!r} is not an ensemble; GET /v1/models/{name} shows it",
                           details={"name": name})
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        mvs = self._call(f"versions of {name!r}", self.client.search_model_versions, f"name = '{name}'",
                         order_by=["version_number DESC"])
        versions = [self._version(mv, aliases) for mv in mvs]
        current = next((v for v in versions if v["version"] == aliases.get("champion")),
                       versions[0] if versions else None)
        return {
            "name": name,
            "description": rm.description or "",
            "aliases": aliases,
            "current_version": current["version"] if current else None,
            "definition": current["definition"] if current else None,
            "versions": versions,
        }

    @staticmethod
    def _version(mv, aliases: dict[str, str]) -> dict[str, Any]:
        tags = dict(mv.tags or {})
        defn = json.loads(tags[DEFINITION_TAG]) if DEFINITION_TAG in tags else None
        try:
            report = json.loads(tags.get(TAG_REPORT) or "{}")
        except ValueError:
            report = {}
        members = []
        for i, m in enumerate((defn or {}).get("members") or []):
            mm = (report.get("member_metrics") or [None] * (i + 1))
            members.append({"ref": m.get("ref"), "name": m["name"], "version": m["version"], "weight": m["weight"],
                            "runtime": m.get("runtime"), "metrics": mm[i] if i < len(mm) else None})
        return {
            "version": str(mv.version),
            "aliases": sorted(a for a, v in aliases.items() if v == str(mv.version)),
            "stage": tags.get(TAG_STAGE, "none"),
            "method": (defn or {}).get("method"),
            "combine": ((defn or {}).get("combine") or {}).get("kind"),
            "members": members,
            "metrics": report.get("metrics"),
            "beats_best_member": report.get("beats_best_member"),
            "fused": bool(report.get("fused")),
            "definition": defn,
        }
