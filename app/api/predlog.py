"""Prediction log routes: reading an endpoint's logged predictions, its log's stats, and erasure.

Reads go straight to the log's parquet files (``app.predlog.query``, in a thread); stats and
erasure go to ``ctx.predlog`` (the PredictionLog actor in the Gateway, an in-process log in
tests: ``app.predlog.control``), which owns the files' writing.
"""

from __future__ import annotations

import asyncio
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.errors import DependencyUnavailable, InvalidInput, MatihError, NotFound
from app.predlog import query as predlog_query
from app.predlog.service import check_endpoint_name

DEFAULT_WINDOW = timedelta(hours=24)
MAX_WINDOW = timedelta(days=31)
MAX_ERASE_IDS = 10_000
_SPACE_OFFSET = re.compile(r"T.* \d{2}:?\d{2}$")  # "+00:00" whose "+" a URL turned into a space


class PredictionItem(BaseModel):
    request_id: str = Field(..., description="The server-issued request id (also in the prediction's X-Request-Id).")
    instance: int = Field(..., description="The row of the request (0-based): a request of n rows is n records.")
    client_request_id: str | None = Field(None, description="The client's own request id, when it sent one.")
    timestamp: str = Field(..., description="When the request arrived (ISO 8601, UTC).")
    endpoint: str
    variant: str = Field(..., description="The traffic variant that served it (empty for a one-leg endpoint).")
    model: str
    model_version: str
    protocol: str = Field(..., description="rest, v2 or grpc.")
    inputs: dict[str, Any] | None = Field(None, description="Features by name; null when the endpoint keeps no inputs.")
    prediction: Any = Field(None, description="The label or value; null when the endpoint keeps no outputs.")
    probabilities: list[float] | None = Field(None, description="Class probabilities, when the caller asked for them.")
    latency_ms: float = Field(..., description="The request's time in the Gateway, model call included.")
    caller: str | None = Field(None, description="The principal that called; null when not kept.")
    features: dict[str, Any] | None = Field(
        None, description="An enriching endpoint's stored features joined to the row: {values: {feature: value}, "
        "stale?: [...], missing?: [...]}; null when the endpoint does not enrich.",
    )


class PredictionPage(BaseModel):
    items: list[PredictionItem]
    next_page_token: str | None = Field(None, description="Pass as page_token for the next page; null on the last.")


class LogStats(BaseModel):
    model_config = ConfigDict(extra="allow")

    endpoint: str
    received: int = Field(..., description="Records the PredictionLog actor received since it started.")
    written: int = Field(..., description="Records it wrote to parquet since it started.")
    dropped: int = Field(..., description="Records dropped since the actor started (full replica buffers, as "
                         "the replicas reported them, and records past actor_max_pending_records).")
    erased: int = Field(0, description="Records removed by erasure requests since the actor started.")
    pending: int = Field(0, description="Records received and not written yet.")
    files: int = Field(..., description="Parquet files of the endpoint in the log now.")
    bytes: int = Field(..., description="Their size in bytes.")
    partitions: int = Field(0, description="Hour partitions of the endpoint.")
    oldest_hour: str | None = Field(None, description="The oldest hour partition (YYYY-MM-DDTHH, UTC).")
    newest_hour: str | None = Field(None, description="The newest hour partition.")
    last_write: str | None = Field(None, description="When the actor last wrote records of the endpoint.")
    replica: dict[str, Any] = Field(
        default_factory=dict, description="This Gateway replica's buffer: records buffered now (all endpoints) and "
        "this endpoint's records it dropped since it started."
    )


class EraseRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_ids: list[str] | None = Field(
        None, min_length=1, max_length=MAX_ERASE_IDS, description="Server-issued request ids whose records go."
    )
    caller: str | None = Field(
        None, min_length=1, max_length=256, description="The caller (principal name) whose records go."
    )


class EraseResult(BaseModel):
    model_config = ConfigDict(extra="allow")

    records_removed: int = Field(..., description="Records (rows) removed from the log's files.")
    files_rewritten: int = Field(..., description="Files rewritten without them (or deleted when emptied).")
    pending_removed: int = Field(0, description="Records received but not yet written that were dropped.")
    feedback_removed: int = Field(0, description="Feedback rows of the erased requests deleted (erasure by request "
                                  "ids; erasure by caller leaves feedback, which names no caller).")


def parse_time(value: str, field: str) -> datetime:
    """An ISO 8601 time (naive = UTC), or InvalidInput naming ``field``."""
    text = value.strip()
    if _SPACE_OFFSET.search(text):
        text = text[: text.rindex(" ")] + "+" + text[text.rindex(" ") + 1:]
    try:
        parsed = datetime.fromisoformat(text)
        parsed = parsed.replace(tzinfo=timezone.utc) if parsed.tzinfo is None else parsed.astimezone(timezone.utc)
        parsed + timedelta(hours=1)  # noqa: B018 -- hour partitions are counted up to until; not past year 9999
    except (ValueError, OverflowError):
        shown = repr(value) if len(value) <= 48 else repr(value[:45]) + "..."
        raise InvalidInput(
            f"{field} {shown} is not an ISO 8601 time; use e.g. 2026-12-03T07:00:00Z", details={"field": field}
        ) from None
    return parsed


def time_range(since: str | None, until: str | None, *, now: datetime | None = None) -> tuple[datetime, datetime]:
    """(since, until) of a read: default the last 24 hours; until after since, at most 31 days."""
    end = parse_time(until, "until") if until is not None else (now or datetime.now(timezone.utc))
    start = parse_time(since, "since") if since is not None else end - DEFAULT_WINDOW
    if end <= start:
        raise InvalidInput(f"until ({end.isoformat()}) must be after since ({start.isoformat()})",
                           details={"field": "until"})
    if end - start > MAX_WINDOW:
        raise InvalidInput(f"since..until spans {end - start}; at most {MAX_WINDOW.days} days per read (page "
                           "through shorter ranges, or read with app.predlog.read)", details={"field": "since"})
    return start, end


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/endpoints/{name}", tags=["prediction log"])

    async def known(name: str) -> None:
        """404 unless ``name`` is an endpoint now or has records in the log (a deleted one may)."""
        try:
            await asyncio.to_thread(ctx.store.get_endpoint, name)
            return
        except NotFound:
            try:
                check_endpoint_name(name)
                if await asyncio.to_thread(predlog_query.log_exists, ctx.settings, name):
                    return
            except InvalidInput:
                pass
            except OSError as exc:
                raise _storage_down(exc) from None
            raise

    def control():
        if ctx.predlog is None:
            raise DependencyUnavailable("the prediction log is not configured in this gateway")
        return ctx.predlog

    @api.get(
        "/predictions",
        response_model=PredictionPage,
        summary="The endpoint's logged predictions (developer)",
        description="Records with since <= timestamp < until (ISO 8601; default the last 24 hours; at most 31 "
        "days), optionally of one traffic variant, ordered by (timestamp, request_id, instance): one record per "
        "row of a request. Records reach the log within seconds (a replica's buffer, then the PredictionLog "
        "actor's write interval). Developer role: records hold raw inputs.",
    )
    async def predictions(
        name: str,
        since: str | None = Query(None, max_length=64, description="Start of the range (ISO 8601), inclusive."),
        until: str | None = Query(None, max_length=64, description="End of the range (ISO 8601), exclusive."),
        variant: str | None = Query(None, max_length=128, description="Only records of this traffic variant."),
        limit: int = Query(100, ge=1, le=1000),
        page_token: str | None = None,
        _: Principal = developer,
    ) -> dict[str, Any]:
        start, end = time_range(since, until)
        await known(name)
        try:
            items, nxt = await asyncio.to_thread(
                predlog_query.query, ctx.settings, name, start, end, variant=variant, limit=limit,
                page_token=page_token,
            )
        except MatihError:
            raise
        except OSError as exc:
            raise _storage_down(exc) from None
        return {"items": items, "next_page_token": nxt}

    @api.get(
        "/log/stats",
        response_model=LogStats,
        summary="The endpoint's prediction log: received, written, dropped, files",
        description="Counters of the PredictionLog actor since it started (received, written, dropped by full "
        "replica buffers, erased, pending) and the endpoint's files in the log now; `replica` is the buffer of "
        "the Gateway replica that answered.",
    )
    async def log_stats(name: str, _: Principal = viewer) -> dict[str, Any]:
        await known(name)
        out = dict(await control().stats(name))
        buffer = ctx.prediction_buffer
        if buffer is not None:
            local = buffer.stats()
            out["replica"] = {"buffered": local["buffered"], "capacity": local["capacity"],
                              "dropped": local["dropped_by_endpoint"].get(name, 0)}
        return out

    @api.post(
        "/predictions/erase",
        response_model=EraseResult,
        summary="Erase the endpoint's records of some requests or of a caller (admin)",
        description='Body {"request_ids": [...]} (at most 10,000) or {"caller": "..."}: every file holding such '
        "records is rewritten without them; records still on their way (in a replica's buffer) are dropped when "
        "they arrive, for predlog.erase_remember_s; feedback rows of the erased request ids are deleted too. Audited.",
    )
    async def erase(name: str, body: EraseRequest, who: Principal = admin) -> dict[str, Any]:
        if (body.request_ids is None) == (body.caller is None):
            raise InvalidInput('send exactly one of "request_ids" or "caller"', details={"field": "request_ids"})
        if body.request_ids is not None:
            bad = next((r for r in body.request_ids if not isinstance(r, str) or not 0 < len(r) <= 256), None)
            if bad is not None:
                raise InvalidInput("each request id must be a string of 1 to 256 characters",
                                   details={"field": "request_ids"})
        await known(name)
        result = await control().erase(name, body.request_ids, body.caller)
        if body.request_ids:
            from app.predlog.feedback import FeedbackStore

            result = {**result, "feedback_removed": await asyncio.to_thread(
                FeedbackStore(ctx.store).erase, name, body.request_ids, who.name)}
        what = {"request_ids": body.request_ids} if body.request_ids is not None else {"caller": body.caller}
        await asyncio.to_thread(ctx.store.record_audit, who.name, "predictions.erase", "endpoint", name, what, result)
        return result

    return api


def _storage_down(exc: OSError) -> DependencyUnavailable:
    return DependencyUnavailable(f"the prediction log's storage is not readable: {type(exc).__name__}: {exc}"[:500])
