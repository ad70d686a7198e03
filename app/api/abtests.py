"""A/B test routes: ``/v1/abtests``. A test names an endpoint with a traffic plan; its analysis
reads the endpoint's prediction log and feedback over the test's window (``app.experiments``).
Reads of the log and the store run in threads."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.experiments.service import ABTestService
from app.experiments.spec import ABTestSpec
from app.schemas import Page


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    svc = ABTestService(ctx.store, ctx.settings)
    api = APIRouter(prefix="/v1/abtests", tags=["experiments"])

    @api.post(
        "", status_code=201, summary="Start an A/B test on an endpoint's traffic plan (developer)",
        description="The endpoint must have a fixed traffic plan with two or more variants carrying traffic (409 "
        "otherwise); the control (default: the plan's first variant) must be one of them (422). The method must fit "
        "the metric (422): binary metrics (conversion, accuracy, error_rate) take z_test, msprt or bayesian; "
        "continuous ones (value, rmse, latency) welch, mann_whitney, msprt or bayesian. Audited; raises an "
        "`abtest.created` event. 201 with the test and its `id`.",
    )
    async def create(spec: ABTestSpec, who: Principal = developer) -> dict[str, Any]:
        return await asyncio.to_thread(svc.create, spec, who.name)

    @api.get("", response_model=Page, summary="List A/B tests, newest first")
    async def list_tests(
        endpoint: str | None = Query(None, max_length=128, description="Only the tests of this endpoint."),
        limit: int = Query(50, ge=1, le=500), page_token: str | None = None, _: Principal = viewer,
    ) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(svc.list, endpoint, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.get("/{test_id}", summary="An A/B test: its spec, status and latest verdict")
    async def get_test(test_id: str, _: Principal = viewer) -> dict[str, Any]:
        return await asyncio.to_thread(svc.get, test_id)

    @api.post("/{test_id}/stop", summary="Stop an A/B test (developer): its window ends now",
              description="409 when it is stopped already. Audited; raises an `abtest.stopped` event.")
    async def stop_test(test_id: str, who: Principal = developer) -> dict[str, Any]:
        return await asyncio.to_thread(svc.stop, test_id, who.name)

    @api.get(
        "/{test_id}/analysis", summary="Analyse an A/B test now",
        description="Per arm: n, mean and its confidence interval; per treatment and metric (primary and "
        "guardrails): the test's effect (treatment - control), interval and p-value, Holm-adjusted over every "
        "arm and metric; Bayesian tests: each arm's probability to be best and expected loss; the sample ratio "
        "mismatch check (p < 0.001: `reliable: false`); the sample-size calculator's n per arm when mde is set; "
        "and a verdict (insufficient_data, no_difference_yet, treatment_wins, control_wins, guardrail_failed, "
        "unreliable_srm) with its reasons. msprt results are always valid: the analysis may be read at any time.",
    )
    async def analysis(test_id: str, _: Principal = viewer) -> dict[str, Any]:
        return await asyncio.to_thread(svc.analysis, test_id)

    @api.get("/{test_id}/report.html", response_class=HTMLResponse,
             summary="The A/B test's report: verdict, metric per arm over time, confidence sequences, tables")
    async def report(test_id: str, _: Principal = viewer) -> HTMLResponse:
        page = await asyncio.to_thread(svc.report, test_id)
        return HTMLResponse(page, headers={"Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'"})

    return api
