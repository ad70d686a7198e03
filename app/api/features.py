"""Feature store routes: the definitions. ``/v1/features/entities``, ``/sources``, ``/views`` and
``/services``, each applied to the managed Feast repo through Feast's ``FeatureStore.apply``
(``app.features.definitions``): what they make is what ``feast -c $FEAST_REPO_PATH ... list``
and Feast's SDK see. Writes need the developer role and are audited; Feast runs in threads.

No ``from __future__ import annotations``: the routes are made in a loop, and FastAPI reads each
body model from its annotation."""

import asyncio
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Response
from pydantic import BaseModel

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.features.definitions import FeatureDefinitions
from app.features.specs import DTYPES, EntityDef, ServiceDef, SourceDef, ViewDef

_APPLY = ("Apply semantics are `feast apply`'s: 201 when the name is new, 200 when it replaces the definition of "
          "that name. Everything is checked before Feast is called, so a refused definition (422 naming the field, "
          "409 naming what it would break) leaves the registry as it was. Audited.")

_KINDS: list[tuple[str, str, type[BaseModel], str, str]] = [
    # (path, kind, request model, summary of the object, extra description)
    ("entities", "entity", EntityDef, "a feature entity: what features are about, and its join key column",
     "`join_keys`: one column (default: the name). Changing the join key of an entity that views use is 409."),
    ("sources", "source", SourceDef, "a data source: a parquet file or folder, or a push source",
     "`path` must lie inside the data roots (`storage.data_roots`) and hold parquet with `timestamp_field`. "
     "`kind: push` makes a Feast PushSource whose batch (offline) data is `path`; `stream` ({kind: kafka|redis, "
     "topic}) declares where the StreamIngestor reads its events (push sources only). Replacing a source re-applies "
     "the views that read it (409 when its kind changes or they would lose a column)."),
    ("views", "view", ViewDef, "a feature view: features of entities, read from a source",
     "`entities` and `source` must exist; `schema` names columns of the source with dtypes from "
     + ", ".join(DTYPES) + " (empty: Feast infers every other column). `ttl_s`: how old a value may be and "
     "still be served (0: forever). Dropping a feature a feature service reads is 409."),
    ("services", "service", ServiceDef, "a feature service: the named set of features a model reads",
     "`features`: 'view' (all its features) or 'view:feature'; each must exist (422 naming `features[i]`)."),
]


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    defs = FeatureDefinitions(ctx.settings)
    api = APIRouter(prefix="/v1/features", tags=["features"])
    for path, kind, model, what, more in _KINDS:
        _routes(api, ctx, defs, path, kind, model, what, more, viewer, developer)
    return api


def _routes(api: APIRouter, ctx: ApiContext, defs: FeatureDefinitions, path: str, kind: str,
            model: type[BaseModel], what: str, more: str, viewer, developer) -> None:
    apply_fn: Callable = getattr(defs, f"apply_{kind}")
    list_fn: Callable = getattr(defs, f"list_{path}")
    get_fn: Callable = getattr(defs, f"get_{kind}")
    delete_fn: Callable = getattr(defs, f"delete_{kind}")
    resource = f"feature_{kind}"

    async def apply(spec: model, response: Response, who: Principal = developer) -> dict[str, Any]:  # type: ignore[valid-type]
        obj, before = await asyncio.to_thread(apply_fn, spec)
        response.status_code = 200 if before is not None else 201
        await asyncio.to_thread(ctx.store.record_audit, who.name, f"features.{kind}.apply", resource,
                                obj["name"], before, obj)
        return obj

    async def list_all(_: Principal = viewer) -> dict[str, Any]:
        return {"items": await asyncio.to_thread(list_fn)}

    async def get_one(name: str, _: Principal = viewer) -> dict[str, Any]:
        return await asyncio.to_thread(get_fn, name)

    async def delete(name: str, who: Principal = developer) -> dict[str, Any]:
        before = await asyncio.to_thread(delete_fn, name)
        await asyncio.to_thread(ctx.store.record_audit, who.name, f"features.{kind}.delete", resource, name,
                                before, None)
        return {"deleted": name, "was": before}

    api.add_api_route(f"/{path}", apply, methods=["POST"], status_code=201,
                      summary=f"Create or replace {what} (developer)", description=f"{more} {_APPLY}",
                      responses={200: {"description": "Replaced the definition of that name."},
                                 409: {"description": "The change would break objects that use it."}})
    api.add_api_route(f"/{path}", list_all, methods=["GET"], summary=f"List the feature {path}",
                      description=f"Every {kind} of the platform's Feast project, by name, with what uses it.")
    api.add_api_route(f"/{path}/{{name}}", get_one, methods=["GET"], summary=f"One feature {kind}",
                      description="As Feast's registry holds it, with its created and updated times.")
    api.add_api_route(f"/{path}/{{name}}", delete, methods=["DELETE"], summary=f"Delete a feature {kind} (developer)",
                      description="Through `feast apply`'s deletion (online tables of a view are dropped). 409 naming "
                      "the users while something uses it (a view uses entities and sources, a service views). "
                      "Audited.")
