"""Registry mutations that touch MLflow and the metadata store, made recoverable.

Each one (create a version, change a version's stage, delete a model) is an outbox entry in
the metadata store (``registry_ops``): the intent is written (``pending``) before the first
MLflow call, and completed (``done``, with its audit record in the same transaction) or
``rolled_back`` after the last. A process that dies in between leaves the entry pending;
:func:`recover`, run when the RegistryCache actor starts, settles it from what MLflow holds:

- ``model_version.create``: the version carries the tag ``matih.op`` (a nonce from the
  intent), set in the same ``create_model_version`` call as every other tag; found -> done
  (with its audit record), not found -> rolled back (nothing was registered);
- ``model_version.stage``: finished forward (the alias and tag changes are repeatable),
  unless the version is gone or a later stage change of the model completed since
  (then rolled back: the later one stands);
- ``model.delete``: finished forward (endpoints were checked under the model's guard when
  the intent was written, and none may be created while it is pending).

Only entries older than ``registry.outbox_recover_after_s`` are touched, so a mutation still
in flight in a live Gateway is left to finish on its own.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from app.errors import DependencyUnavailable, MatihError, NotFound

log = logging.getLogger(__name__)

OP_CREATE = "model_version.create"
OP_STAGE = "model_version.stage"
OP_DELETE = "model.delete"
TAG_OP = "matih.op"  # on a version: the nonce of the outbox entry that created it


def new_nonce() -> str:
    return uuid.uuid4().hex


def find_version_by_op(client, name: str, nonce: str):
    """The version of ``name`` created by the outbox entry with ``nonce``, or None."""
    from mlflow.exceptions import MlflowException

    token = None
    try:
        while True:
            page = client.search_model_versions(f"name = '{name}'", max_results=1000, page_token=token)
            for mv in page:
                if (mv.tags or {}).get(TAG_OP) == nonce:
                    return mv
            token = page.token
            if not token:
                return None
    except MlflowException as exc:
        if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return None
        raise


def recover(service, *, older_than_s: float) -> list[dict[str, Any]]:
    """Settle the registry ops a crash left pending (see the module docstring); returns what
    was done to each: ``{"id", "op", "model", "outcome"}``. Ops that cannot be settled now
    (MLflow unreachable) stay pending for the next start."""
    store = service.store
    settled = []
    for op in store.pending_ops(older_than_s=older_than_s):
        try:
            outcome = _settle(service, op)
        except DependencyUnavailable as exc:
            log.warning("registry op %s (%s of %s) left pending: %s", op["id"], op["op"], op["model"], exc.message)
            continue
        except MatihError as exc:
            store.finish_op(op["id"], "rolled_back", error=f"recovery: {exc.message}")
            outcome = "rolled_back"
        log.info("registry op %s (%s of %s) recovered: %s", op["id"], op["op"], op["model"], outcome)
        settled.append({"id": op["id"], "op": op["op"], "model": op["model"], "outcome": outcome})
    return settled


def _settle(service, op: dict[str, Any]) -> str:
    store, name, payload = service.store, op["model"], op["payload"]
    if op["op"] == OP_CREATE:
        with service._mlflow(f"versions of {name!r}"):
            mv = find_version_by_op(service.client, name, payload.get("nonce", ""))
        if mv is None:
            store.finish_op(op["id"], "rolled_back", error="recovery: no version was created before the crash")
            return "rolled_back"
        view = service._version_view(mv)
        store.finish_op(op["id"], "done", version=str(mv.version),
                        audit=(OP_CREATE, "model_version", f"{name}/{mv.version}", None, view))
        return "done"
    if op["op"] == OP_STAGE:
        version, stage = op["version"], payload["stage"]
        if store.later_op_done(op["id"], name, OP_STAGE):
            store.finish_op(op["id"], "rolled_back", error="recovery: a later stage change of the model stands")
            return "rolled_back"
        try:
            view = service._apply_stage(name, version, stage, op["actor"], bool(payload.get("archive_existing")))
        except NotFound:
            store.finish_op(op["id"], "rolled_back", error=f"recovery: version {version} of {name!r} is gone")
            return "rolled_back"
        store.finish_op(op["id"], "done", audit=(f"model_version.stage.{stage}", "model_version", f"{name}/{version}",
                                                 payload.get("before"), {"stage": stage, "aliases": view["aliases"]}))
        return "done"
    if op["op"] == OP_DELETE:
        try:
            with service._mlflow(f"model {name!r}"):
                service.client.delete_registered_model(name)
        except NotFound:
            pass  # the delete itself went through before the crash
        store.finish_op(op["id"], "done", audit=(OP_DELETE, "model", name, payload.get("before"), None))
        return "done"
    store.finish_op(op["id"], "rolled_back", error=f"recovery: unknown op {op['op']!r}")
    return "rolled_back"
