"""A version's lifecycle: aliases, stages, approval and trust.

Stage rules (``POST .../stage``):

- ``staging`` and ``production`` are the aliases of the same names plus the tag
  ``matih.stage``; moving one to a version takes it from the version that held it (which
  loses its stage, or is archived with ``archive_existing``).
- ``production`` needs ``matih.validation=passed`` (``registry.production_requires_validation``),
  an admin's approval (``registry.production_requires_approval``), and, for pickle-based
  versions, trust. Approval and trust are records in the metadata store, with the sha256 of
  the version's model file; the ``matih.approved_by`` / ``matih.trusted`` tags mirror them.
  An archived version goes back to ``staging`` first.
- Every stage change goes through the registry outbox (``app/registry/outbox.py``).
- ``archived`` removes every alias from the version and sets the tag; archived versions are
  never served (``check_servable``) and take no aliases until restored to staging.
"""


from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Any

from app.errors import Conflict, DependencyUnavailable, InvalidInput, MatihError, NotFound
from app.registry import formats as F
from app.registry.base import (
    TAG_APPROVAL_COMMENT,
    TAG_APPROVED_AT,
    TAG_SHA256,
    TAG_TRUSTED_AT,
    TAG_TRUSTED_BY,
    RegistryBase,
    _now,
)
from app.registry.checks import check_alias
from app.registry.mlflow_registry import (
    TAG_APPROVED_BY,
    TAG_FORMAT,
    TAG_FORMATS,
    TAG_STAGE,
    TAG_TRUSTED,
    TAG_VALIDATION,
    ResolvedModel,
)
from app.registry.outbox import OP_STAGE

log = logging.getLogger(__name__)

STAGES = ("staging", "production", "archived")
STAGE_ALIASES = ("staging", "production")


class LifecycleMixin(RegistryBase):
    """Aliases, stages (the rules above), approval and trust."""

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
        """Move a version to ``stage`` (the rules in the module docstring), through the outbox:
        the intent, the MLflow alias and tag changes (:meth:`_apply_stage`), the completion
        with its audit record. If MLflow fails midway the intent stays pending, and recovery
        finishes the change (unless a later one completed first)."""
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
            if current == "archived":  # _check_production says so; belt and braces
                raise Conflict(f"version {version} of {name!r} is archived; move it to staging first")
        op_id, _ = self._begin_op(OP_STAGE, name, actor,
                                  {"stage": stage, "archive_existing": archive_existing, "before": before},
                                  version=version)
        try:
            view = self._apply_stage(name, version, stage, actor, archive_existing)
        except BaseException as exc:
            if not isinstance(exc, DependencyUnavailable):
                self._finish_op(op_id, "rolled_back", error=getattr(exc, "message", None) or type(exc).__name__)
            raise
        self._finish_op(op_id, "done", audit=(f"model_version.stage.{stage}", "model_version", f"{name}/{version}",
                                              before, {"stage": stage, "aliases": view["aliases"]}))
        return view

    def _apply_stage(self, name: str, version: str, stage: str, actor: str, archive_existing: bool) -> dict[str, Any]:
        """The MLflow side of a stage change, from MLflow's state now: repeatable, so recovery
        can run it again after a crash midway. Returns the version's view."""
        rm = self._rm(name)
        aliases = {a: str(v) for a, v in (rm.aliases or {}).items()}
        if stage == "archived":
            with self._mlflow(f"aliases of {name!r}"):
                for alias, held in aliases.items():
                    if held == version:
                        self.client.delete_registered_model_alias(name, alias)
        else:
            previous = aliases.get(stage)
            if previous and previous != version:
                self._leave_stage(name, previous, stage, actor, archive_existing)
            with self._mlflow(f"alias {stage!r} of {name!r}"):
                self.client.set_registered_model_alias(name, stage, version)
                other = "staging" if stage == "production" else "production"
                if aliases.get(other) == version:
                    self.client.delete_registered_model_alias(name, other)
        self._set_tags(name, version, {TAG_STAGE: stage})
        return self._version_view(self._mv(name, version))

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
        trust, approvals = self._grants(name)  # the metadata store's records; tags only mirror them
        if rules.production_requires_approval and not approvals.get(version):
            missing.append(f"an admin's approval (POST {base}/approve)")
        if tags.get(TAG_FORMAT) in F.PICKLE_FORMATS and "onnx" not in json.loads(tags.get(TAG_FORMATS, "[]")) \
                and version not in trust:
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

    def _artifact_sha256(self, name: str, version: str) -> str:
        """sha256 of the version's model file as MLflow holds it now (downloaded to hash it)."""
        from app.registry.trust import model_sha256

        with tempfile.TemporaryDirectory(prefix="matih-digest-") as tmp:
            path = self.registry.download_to(ResolvedModel(name, version), Path(tmp) / "model")
            return model_sha256(path)

    def _mirror_tags(self, name: str, version: str, tags: dict[str, str]) -> None:
        """Mirror a store record into MLflow tags for people reading MLflow; nothing decides on them."""
        try:
            self._set_tags(name, version, tags)
        except MatihError as exc:
            log.warning("could not mirror %s onto %s/%s in MLflow: %s", sorted(tags), name, version, exc.message)

    def approve(self, name: str, version: str | int, actor: str, comment: str = "") -> dict[str, Any]:
        """Record an admin's approval for production in the metadata store, with the sha256 of
        the version's model file (the tags matih.approved_by/_at mirror it in MLflow)."""
        store = self._require_store("approvals")
        mv = self._mv(name, version)
        version = str(mv.version)
        if (mv.tags or {}).get(TAG_STAGE) == "archived":
            raise Conflict(f"version {version} of {name!r} is archived; move it to staging before approving it")
        store.add_approval(name, version, self._artifact_sha256(name, version), actor, comment[:4000])
        tags = {TAG_APPROVED_BY: actor, TAG_APPROVED_AT: _now()}
        if comment:
            tags[TAG_APPROVAL_COMMENT] = comment[:4000]
        self._mirror_tags(name, version, tags)
        return self._version_view(self._mv(name, version))

    def trust(self, name: str, version: str | int, actor: str) -> dict[str, Any]:
        """Trust a pickle-based version: the metadata store records the sha256 of its file as
        MLflow holds it now, and from then on the native runtime and ``convert`` unpickle that
        file, and only while its bytes still hash to it. Only for pickle-based versions; the
        admin vouches for the file. (The tag matih.trusted mirrors the record; setting it by
        hand in MLflow trusts nothing.)"""
        store = self._require_store("trust records")
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
        digest = self._artifact_sha256(name, version)
        registered = tags.get(TAG_SHA256)
        if registered and registered != digest:
            raise Conflict(
                f"version {version} of {name!r}: its file in MLflow (sha256 {digest}) is not the file registered "
                f"(sha256 {registered}); it was replaced after registration, so it is not trusted",
                code="artifact_changed",
                details={"sha256": digest, "registered_sha256": registered},
            )
        store.set_trust(name, version, digest, actor)
        self._mirror_tags(name, version, {TAG_TRUSTED: "true", TAG_TRUSTED_BY: actor, TAG_TRUSTED_AT: _now()})
        return self._version_view(self._mv(name, version))
