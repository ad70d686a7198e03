"""Events route: ``GET /v1/events``, the outbox of platform events (CloudEvents 1.0 JSON).

Readable by viewers: an event holds only what a viewer already reads through the other
routes (jobs with their errors, model versions, endpoints with credentials masked), never
who made the change (that is the admin-only audit log)."""

from __future__ import annotations

import asyncio
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.events.outbox import Outbox, check_type_filter
from app.errors import InvalidInput


class EventPage(BaseModel):
    items: list[dict[str, Any]] = Field(
        description="CloudEvents 1.0 in JSON (specversion, id, source, type, subject, time, datacontenttype, "
        "data, and the sequence extension: the event's position in the outbox), oldest first."
    )
    next_page_token: str | None = Field(None, description="Pass as page_token for the next page; null at the end.")


def parse_since(value: str | None) -> datetime | str | None:
    """``since`` as the outbox takes it: an RFC 3339 time (``Z`` or an offset; a time without
    one is UTC), or else an event id or sequence (looked up by the outbox)."""
    if value is None or value == "":
        return None
    if len(value) > 64:
        raise InvalidInput("since is longer than 64 characters; pass an RFC 3339 time, an event id or a sequence",
                           details={"field": "since"})
    if "-" not in value:
        return value  # a sequence or an event id (hex); the outbox says 422 when it knows neither
    try:
        when = datetime.fromisoformat(value)
        return when.replace(tzinfo=timezone.utc) if when.tzinfo is None else when.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise InvalidInput(
            f"since {value!r} is not an RFC 3339 time such as 2026-01-31T08:00:00Z, an event id or a sequence",
            details={"field": "since"},
        ) from None


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, _developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/events", tags=["events"])
    outbox = Outbox(ctx.store)

    @api.get(
        "", response_model=EventPage, summary="Platform events (CloudEvents), oldest first",
        description="The outbox of events: training.job.*, batch.job.*, model.version.*, endpoint.*. Every event "
        "is here whatever the sink (none, kafka, redis) until it is events.keep_published_days old. `since`: an "
        "RFC 3339 time (events at or after it), or an event's id or sequence (events after it: pass the last one "
        "you read to poll). `type`: a type or a dotted prefix (`training.job`, `model.version`). 422 for a bad "
        "`since`, `type` or `page_token`. Role viewer.",
    )
    async def list_events(
        since: str | None = Query(None, description="RFC 3339 time, or the id or sequence of the last event read."),
        type: str | None = Query(None, description="An event type or a dotted prefix of types."),  # noqa: A002
        limit: int = Query(100, ge=1, le=1000),
        page_token: str | None = None,
        _: Principal = viewer,
    ) -> dict[str, Any]:
        after = parse_since(since)
        if type:
            check_type_filter(type)
        items, nxt = await asyncio.to_thread(outbox.read, since=after, type_=type, limit=limit, page_token=page_token)
        return {"items": items, "next_page_token": nxt}

    return api
