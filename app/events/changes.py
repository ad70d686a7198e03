"""Which event each change of the metadata store raises, and what its ``data`` holds.

The store (``app.store.MetadataStore``) calls these inside the transaction of the change and
writes the result to the outbox. ``data`` holds only what a viewer already reads through the
API (a job's error, an endpoint as ``GET /v1/endpoints/{name}`` shows it, with its credentials
masked); never the acting principal, which stays in the admin-only audit log.

Each function returns ``(type, subject, data)``, a list of them, or None when the change
raises no event.

Versions a training job registers are registered by the job itself, straight in MLflow
(``app.training.pipeline.register_version``, repeatable after a crash), not through the
registry service; their ``model.version.registered`` and ``model.version.alias_changed``
events are written with the job's ``succeeded`` transition, whose result names them.
"""

from __future__ import annotations

from typing import Any

from app.events import model as m

EventSpec = tuple[str, str, dict[str, Any]]

_ENDPOINT_FIELDS = ("name", "target", "runtime", "config", "spec", "spec_version")
_OP_CREATE, _OP_STAGE = "model_version.create", "model_version.stage"  # app.registry.outbox's op names


def job_changed(job: dict[str, Any], previous_status: str | None) -> EventSpec | list[EventSpec]:
    """A job (``MetadataStore._job_dict``, errors already redacted) created or moved to a new
    status; a training job that succeeded and registered a version also raises that version's
    events (after the job's own)."""
    data: dict[str, Any] = {
        "job_id": job["job_id"], "kind": job["kind"], "name": job["name"], "status": job["status"],
        "previous_status": previous_status, "attempts": job["attempts"], "priority": job["priority"],
    }
    if job["status"] == "failed":
        data["error"] = job["error"]
    if job["status"] == "succeeded":
        data["result"] = job["result"]
    if job["status"] in ("succeeded", "failed", "cancelled"):
        data["started_at"], data["finished_at"] = job["started_at"], job["finished_at"]
    own = (m.job_event_type(job["kind"], job["status"]), m.job_subject(job["job_id"]), data)
    result = job.get("result") or {}
    if job["status"] != "succeeded" or job["kind"] != "training" or not result.get("model_name") \
            or not result.get("model_version"):
        return own
    name, version = str(result["model_name"]), str(result["model_version"])
    subject = m.model_version_subject(name, version)
    out = [own, (m.MODEL_VERSION_REGISTERED, subject,
                 {"model": name, "version": version, "source_kind": "training_job", "job_id": job["job_id"],
                  "run_id": result.get("run_id"), "stage": "none", "aliases": list(result.get("aliases") or [])})]
    for alias in result.get("aliases") or []:
        out.append((m.MODEL_VERSION_ALIAS_CHANGED, subject,
                    {"model": name, "alias": alias, "version": version, "job_id": job["job_id"]}))
    return out


def endpoint_changed(
    type_: str, before: dict[str, Any] | None, after: dict[str, Any] | None
) -> EventSpec:
    """An endpoint created, updated or deleted; ``before``/``after`` are redacted endpoint dicts."""
    current = after if after is not None else before
    data = {k: current.get(k) for k in _ENDPOINT_FIELDS}
    if type_ == m.ENDPOINT_UPDATED and before is not None:
        data["before"] = {k: before.get(k) for k in _ENDPOINT_FIELDS if k != "name"}
        data["changed"] = sorted(k for k in _ENDPOINT_FIELDS if before.get(k) != current.get(k))
    return type_, m.endpoint_subject(current["name"]), data


def registry_op_done(
    op: str, model: str, version: str | None, payload: dict[str, Any], before: Any, after: Any
) -> EventSpec | None:
    """A registry op (``app.registry.outbox``) completed with its audit record."""
    if op == _OP_CREATE and version is not None:
        view = after if isinstance(after, dict) else {}
        data = {"model": model, "version": str(version), "source_kind": payload.get("kind")}
        data.update({k: view.get(k) for k in ("run_id", "source", "format", "task", "stage", "aliases")})
        return m.MODEL_VERSION_REGISTERED, m.model_version_subject(model, version), data
    if op == _OP_STAGE and version is not None:
        was = before if isinstance(before, dict) else {}
        now = after if isinstance(after, dict) else {}
        data = {"model": model, "version": str(version), "stage": now.get("stage"),
                "previous_stage": was.get("stage"), "aliases": now.get("aliases"),
                "previous_aliases": was.get("aliases")}
        return m.MODEL_VERSION_STAGE_CHANGED, m.model_version_subject(model, version), data
    return None


def audited(action: str, resource_id: str, before: Any, after: Any) -> EventSpec | None:
    """A change recorded with ``MetadataStore.record_audit`` (its state lives in MLflow): alias
    set (``{alias: old}`` -> ``{alias: new}``) or deleted (``{alias: old}`` -> None)."""
    if action not in ("model.alias.set", "model.alias.delete") or not isinstance(before, dict) or not before:
        return None
    alias, previous = next(iter(before.items()))
    version = after.get(alias) if isinstance(after, dict) else None
    subject_version = version if version is not None else previous
    if subject_version is None:
        return None
    data = {"model": resource_id, "alias": alias, "version": version, "previous_version": previous}
    return m.MODEL_VERSION_ALIAS_CHANGED, m.model_version_subject(resource_id, subject_version), data


_ROLLOUT_FIELDS = ("id", "endpoint", "model", "baseline", "candidate", "status", "step", "percent", "error")


def rollout_changed(type_: str, rollout: dict[str, Any], decision: dict[str, Any] | None = None) -> EventSpec:
    """A canary rollout (``app.rollouts.store``'s dict) started, moved or ended; ``decision``
    (verdict, reasons, the statistics that drove it) when a judgement caused it."""
    data: dict[str, Any] = {k: rollout.get(k) for k in _ROLLOUT_FIELDS}
    data["rollout_id"] = data.pop("id")
    if decision is not None:
        data["decision"] = decision
    return type_, m.rollout_subject(rollout["id"]), data
