"""Feature store routes: ``POST /v1/features/push`` (rows into a push source through Feast's
push API, app/features/push.py) and ``GET /v1/features/streams`` (the push sources' declared
streams and what the StreamIngestor did with them, app/features/streams.py).

Pushing is role developer: it changes the features every endpoint reads at predict time, as
materialization does. Reading the streams' state is role viewer."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal

log = logging.getLogger(__name__)


class PushRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    push_source: str = Field(..., min_length=1, description="Name of a push source that feeds feature views.")
    rows: list[Any] = Field(..., description="Rows as JSON objects: the views' entity join keys and features, and "
                            "the batch source's event timestamp (ISO 8601 or epoch seconds). Other keys are ignored.")
    to: str = Field("online", description="online | offline (appended to the batch source's file) | "
                    "online_and_offline.")


class PushResult(BaseModel):
    push_source: str
    rows: int = Field(description="Rows written.")
    to: str
    views: list[str] = Field(description="Feature views the push source feeds (each got the rows).")


class StreamState(BaseModel):
    push_source: str
    kind: str = Field(description="kafka | redis")
    topic: str = Field(description="Kafka topic or Redis stream key.")
    state: str = Field(description="running | failed (cannot consume: see last_error) | not_running (no "
                       "StreamIngestor answered) | starting (declared since its last scan).")
    rows: int = 0
    batches: int = 0
    dead_letters: int = Field(0, description="Messages skipped: not a JSON object, a missing or bad column.")
    errors: int = Field(0, description="Failed rounds (broker or online store down), each retried.")
    last_error: str | None = None
    lag: int | None = Field(None, description="Messages not yet written and committed (null: unknown).")
    freshness_s: float | None = Field(None, description="Write time minus the newest event time of the last batch.")
    last_event_time: str | None = None
    last_write_at: str | None = None


class StreamsPage(BaseModel):
    items: list[StreamState]
    ingestor: dict[str, Any] = Field(description="The StreamIngestor: started_at, rounds, or error.")


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/features", tags=["features"])

    def store():
        from app.features.repo import open_store

        return open_store(ctx.settings)

    @api.post(
        "/push", response_model=PushResult, summary="Push rows into a push source",
        description="Writes rows through Feast's push API to the online store, the offline store (the batch "
        "source's parquet file, rows appended) or both. All or none: 422 names the first bad field "
        "(`push_source`, `to`, `rows`, `rows[i].column`). At most `features.push_max_rows` rows (10,000 by default). "
        "Per entity key the online store keeps the latest event time. Role developer.",
    )
    async def push(body: PushRequest, _: Principal = developer) -> dict[str, Any]:
        from app.features.push import push_rows

        return await asyncio.to_thread(lambda: push_rows(store(), body.push_source, body.rows, body.to,
                                                          max_rows=ctx.settings.features.push_max_rows))

    @api.get(
        "/streams", response_model=StreamsPage, summary="Declared streams and their ingestion",
        description="Every push source with a stream declaration (Kafka topic or Redis stream key) and what the "
        "StreamIngestor did with it: rows, batches, dead letters, errors, lag, last event time, freshness. "
        "Role viewer.",
    )
    async def streams(_: Principal = viewer) -> dict[str, Any]:
        from app.features.streams import declared_streams

        declared = await asyncio.to_thread(lambda: declared_streams(store()))
        ingestor: dict[str, Any] = {}
        seen: dict[str, dict[str, Any]] = {}
        if ctx.streams is not None:
            try:
                status = await ctx.streams()
                ingestor = {k: v for k, v in status.items() if k != "streams"}
                seen = {s["push_source"]: s for s in status.get("streams", [])}
            except Exception as exc:  # noqa: BLE001 - the declarations still answer
                log.warning("StreamIngestor status: %s", exc)
                ingestor = {"error": f"{type(exc).__name__}: {exc}"}
        else:
            ingestor = {"error": "no StreamIngestor in this process"}
        items = []
        for name, (kind, topic) in sorted(declared.items()):
            state = seen.get(name)
            if state is not None and (state["kind"], state["topic"]) == (kind, topic):
                items.append(state)
            else:
                running = ctx.streams is not None and "error" not in ingestor
                items.append({"push_source": name, "kind": kind, "topic": topic,
                              "state": "starting" if running else "not_running"})
        return {"items": items, "ingestor": ingestor}

    return api
