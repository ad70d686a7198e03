"""Feedback route: ``POST /v1/endpoints/{name}/feedback``, the outcomes of logged predictions
(labels, values, rewards) by the request id the predict answer carried. The work is in
``app.predlog.feedback`` (validation, storage, audit) and ``app.predlog.lookup`` (which ids
the prediction log holds)."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Body, Path
from pydantic import BaseModel, Field

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.errors import InvalidInput
from app.predlog.feedback import FeedbackRow, FeedbackStore
from app.predlog.lookup import request_variants
from app.traffic.spec import BANDITS


class FeedbackResult(BaseModel):
    index: int = Field(..., description="Position of the row in the request body.")
    request_id: str | None = Field(None, description="The row's request id (when it was a string of <= 64 characters).")
    status: Literal["accepted", "rejected"] = Field(..., description="Whether the row was taken.")
    pending: bool | None = Field(
        None, description="Accepted although the prediction log does not hold the id yet (it was issued within "
        "predlog.feedback_grace_s; its record may still be on its way)."
    )
    superseded: bool | None = Field(None, description="The row replaced an earlier value for this prediction.")
    unchanged: bool | None = Field(
        None, description="The row repeats the current value (same outcome; same timestamp if given): nothing stored."
    )
    error: str | None = Field(None, description="Why the row was rejected.")


class FeedbackResponse(BaseModel):
    accepted: int = Field(..., description="Rows taken (stored, or unchanged repeats of the current value).")
    rejected: int = Field(..., description="Rows refused; each has its error in results.")
    results: list[FeedbackResult] = Field(..., description="One result per row of the request, in order.")


def _bandit_arms(endpoint: dict[str, Any]) -> list[str] | None:
    """The variants of the endpoint's traffic plan when its strategy is a bandit (their rewards
    feed the arms); None otherwise."""
    plan = (endpoint.get("spec") or {}).get("traffic")
    if not isinstance(plan, dict) or plan.get("strategy") not in BANDITS:
        return None
    return [v["name"] for v in plan.get("variants") or () if isinstance(v, dict) and v.get("name")]


def router(ctx: ApiContext) -> APIRouter:
    _viewer, predictor, _developer, _admin = role_dependencies(ctx)
    api = APIRouter(tags=["serving"])
    feedback = FeedbackStore(ctx.store)
    limit = ctx.settings.predlog.feedback_max_rows
    grace_s = ctx.settings.predlog.feedback_grace_s
    row_schema = FeedbackRow.model_json_schema()

    @api.post(
        "/v1/endpoints/{name}/feedback",
        response_model=FeedbackResponse,
        response_model_exclude_none=True,
        summary="Report outcomes of predictions: labels, values, rewards",
        description=(
            "A JSON list of 1 to predlog.feedback_max_rows (default 10,000) rows "
            '`{"request_id", "instance"?, "label"?, "value"?, "reward"?, "timestamp"?}`, each naming a prediction '
            "by the request id its predict answer carried (and its row, `instance`, default 0) and giving at "
            "least one outcome. Labels may arrive days later. A later value for the same prediction replaces the "
            "earlier one (both stay on record and are audited); repeating the current value stores nothing. Rows "
            "are checked one by one: a malformed row, or an id the prediction log does not hold and that was "
            "issued more than predlog.feedback_grace_s ago, is rejected with its error while the other rows are "
            "taken; a recent id the log does not hold yet is accepted as `pending`. Each stored row records the "
            "traffic variant that served the prediction; on an endpoint whose traffic plan is a bandit, its reward "
            "feeds that variant's arm (a pending row's once its log record arrives). 404 for an unknown endpoint; "
            "422 for an empty list or one over the limit."
        ),
        openapi_extra={
            "requestBody": {
                "content": {
                    "application/json": {
                        "schema": {"type": "array", "items": row_schema, "minItems": 1, "maxItems": limit}
                    }
                },
                "required": True,
            }
        },
    )
    async def submit_feedback(
        name: str = Path(..., description="The endpoint that served the predictions."),
        rows: Any = Body(..., description="The feedback rows: a JSON list."),
        who: Principal = predictor,
    ) -> dict[str, Any]:
        if not isinstance(rows, list):
            raise InvalidInput(
                'the body must be a JSON list of feedback rows: [{"request_id": ..., "label": ...}, ...]',
                details={"field": "body"},
            )
        if not rows:
            raise InvalidInput("the body is an empty list; send 1 or more feedback rows", details={"field": "body"})
        if len(rows) > limit:
            raise InvalidInput(
                f"{len(rows)} feedback rows in one request; at most {limit} (predlog.feedback_max_rows): "
                "split the batch",
                details={"field": "body", "limit": limit},
            )
        endpoint = await asyncio.to_thread(ctx.store.get_endpoint, name)  # 404 for an unknown endpoint

        def known(ids: list[str]) -> dict[str, str]:
            return request_variants(ctx.settings, name, ids)

        arms = _bandit_arms(endpoint)

        def record() -> list[dict[str, Any]]:
            if arms:  # earlier rewards whose log record was pending count now, before this batch supersedes any
                feedback.settle_pending(name, known, bandit_arms=arms, window_s=2 * grace_s + 60)
            return feedback.record(name, rows, who.name, known=known, grace_s=grace_s, bandit_arms=arms)

        results = await asyncio.to_thread(record)
        accepted = sum(1 for r in results if r["status"] == "accepted")
        return {"accepted": accepted, "rejected": len(results) - accepted, "results": results}

    return api
