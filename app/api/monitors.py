"""Monitoring routes: ``PUT/GET/DELETE /v1/monitors/{endpoint}``, ``POST .../run`` (a
``monitor_run`` job), ``GET .../drift``, ``.../report.html``, ``.../performance``, ``.../loop``,
``POST .../retrain``, and ``POST /v1/models/{name}/versions/{v}/profile`` (a
``reference_profile`` job). Writes need developer; reads, viewer. The logic is in
``app/monitoring``; the DriftMonitor actor runs the schedules and moves the loop on."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Body, Query, Response
from fastapi.responses import HTMLResponse

from app.api.app import ApiContext, role_dependencies
from app.auth import Principal
from app.errors import InvalidInput, NotFound
from app.monitoring.reference import PROFILE_KIND
from app.monitoring.service import submit_run
from app.monitoring.service import _now as utc_now
from app.monitoring.spec import MonitorSpec, parse_monitor_spec
from app.monitoring.store import MonitorStore
from app.names import check_name
from app.schemas import JobAccepted, Page

def _redacted(monitor: dict[str, Any]) -> dict[str, Any]:
    """A monitor as the API shows it: webhook secrets never (only whether one is set)."""
    from app.monitoring.alerts import AlertsSpec

    spec = dict(monitor.get("spec") or {})
    spec["alerts"] = AlertsSpec.model_validate(spec.get("alerts") or {}).public()
    return {**monitor, "spec": spec}


def _body_schema(model) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def router(ctx: ApiContext) -> APIRouter:
    from app.monitoring.alerts import AlertService, AlertsSpec, check_channels, merge_secrets
    from app.monitoring.loop import RetrainLoop
    from app.registry.service import RegistryService

    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(tags=["monitoring"])
    monitors = MonitorStore(ctx.store)

    def _loop() -> RetrainLoop:
        return RetrainLoop(ctx.store, ctx.settings, RegistryService(ctx.settings, ctx.registry, ctx.store))

    @api.put(
        "/v1/monitors/{endpoint}", summary="Create or replace an endpoint's monitor",
        openapi_extra=_body_schema(MonitorSpec),
        description="Body: features (default all), tests ('auto' or per column), thresholds, correction, "
        "drift_share, window ({rows: N} or {hours: H}), schedule ({every_s}), segments, performance, reference, "
        "alerts ({rules, channels}), retraining (the policy). 201 when created, 200 when replaced. 422 names the "
        "field. Webhook secrets are never shown again.",
    )
    async def put(endpoint: str, response: Response, body: dict[str, Any] = Body(...),
                  who: Principal = developer) -> dict[str, Any]:
        check_name(endpoint, "endpoint")
        spec, alerts, retraining = parse_monitor_spec(body)
        cap = ctx.settings.monitoring.max_window_rows
        if spec.window.rows is not None and spec.window.rows > cap:
            raise InvalidInput(f"window.rows {spec.window.rows} is over monitoring.max_window_rows ({cap})",
                               details={"field": "window.rows"})
        check_channels(alerts.channels, ctx.settings)
        previous = await asyncio.to_thread(monitors.find, endpoint)
        if previous is not None:  # a client PUTting back what it read keeps the webhook secrets
            alerts = merge_secrets(alerts, AlertsSpec.model_validate((previous["spec"] or {}).get("alerts") or {}))
        stored = spec.model_dump(mode="json")
        stored["alerts"] = alerts.stored()
        stored["retraining"] = retraining.model_dump(mode="json") if retraining is not None else None
        every = spec.schedule.every_s if spec.schedule else None
        monitor, created = await asyncio.to_thread(monitors.put, endpoint, stored, who.name, utc_now(), every)
        response.status_code = 201 if created else 200
        return _redacted(monitor)

    @api.get("/v1/monitors", response_model=Page, summary="Every monitor")
    async def list_monitors(_: Principal = viewer) -> dict[str, Any]:
        return {"items": [_redacted(m) for m in await asyncio.to_thread(monitors.list)], "next_page_token": None}

    @api.get("/v1/monitors/{endpoint}", summary="An endpoint's monitor and its latest run's verdict")
    async def get(endpoint: str, _: Principal = viewer) -> dict[str, Any]:
        monitor = await asyncio.to_thread(monitors.get, endpoint)
        latest = await asyncio.to_thread(monitors.latest_run, endpoint, status=None)
        out = _redacted(monitor)
        out["latest_run"] = None if latest is None else {
            k: latest[k] for k in ("id", "status", "created_at", "finished_at", "window", "dataset_drift", "error")}
        return out

    @api.delete("/v1/monitors/{endpoint}", status_code=204, summary="Delete a monitor (its runs and alerts stay)")
    async def delete(endpoint: str, who: Principal = developer) -> Response:
        await asyncio.to_thread(monitors.delete, endpoint, who.name)
        await asyncio.to_thread(AlertService(ctx.store, ctx.settings).close_endpoint, endpoint, who.name)
        return Response(status_code=204)

    @api.post("/v1/monitors/{endpoint}/run", status_code=202, summary="Run the monitor now (a monitor_run job)",
              description="202 with the run id and its job id; GET /v1/jobs/{job_id} shows progress and "
              "GET .../drift the result.")
    async def run_now(endpoint: str, who: Principal = developer) -> dict[str, Any]:
        run = await asyncio.to_thread(submit_run, ctx.store, endpoint, trigger="manual", actor=who.name)
        await ctx.jobs.notify()
        return {"run_id": run["id"], "job_id": run["job_id"], "status": run["status"]}

    @api.get("/v1/monitors/{endpoint}/runs/{run_id}", summary="One run: drift, segments, performance, alerts")
    async def get_run(endpoint: str, run_id: str, _: Principal = viewer) -> dict[str, Any]:
        run = await asyncio.to_thread(monitors.get_run, run_id)
        if run["endpoint"] != endpoint:
            raise NotFound(f"run {run_id!r} is not a run of {endpoint!r}'s monitor")
        return run

    @api.get("/v1/monitors/{endpoint}/drift", summary="The latest drift result and the history of verdicts",
             description="`latest`: the newest succeeded run in full (dataset_drift with detected, share and "
             "threshold; per-column results; prediction drift; segments). `history`: runs newest first, each with "
             "its dataset_drift (page with limit and page_token).")
    async def drift(endpoint: str, limit: int = Query(20, ge=1, le=500), page_token: str | None = None,
                    _: Principal = viewer) -> dict[str, Any]:
        await asyncio.to_thread(monitors.get, endpoint)
        latest = await asyncio.to_thread(monitors.latest_run, endpoint)
        history, nxt = await asyncio.to_thread(monitors.list_runs, endpoint, limit=limit, page_token=page_token)
        if latest is not None:
            latest = {k: v for k, v in latest.items() if k != "performance"}
        return {"latest": latest, "history": history, "next_page_token": nxt}

    @api.get("/v1/monitors/{endpoint}/report.html", response_class=HTMLResponse,
             summary="The drift report of a run (the latest by default) as one HTML page")
    async def report(endpoint: str, run_id: str | None = None, _: Principal = viewer) -> HTMLResponse:
        from app.monitoring.report import render

        if run_id:
            run = await asyncio.to_thread(monitors.get_run, run_id)
            if run["endpoint"] != endpoint:
                raise NotFound(f"run {run_id!r} is not a run of {endpoint!r}'s monitor")
        else:
            await asyncio.to_thread(monitors.get, endpoint)
            run = await asyncio.to_thread(monitors.latest_run, endpoint)
            if run is None:
                raise NotFound(f"{endpoint!r}'s monitor has no finished run yet; POST /v1/monitors/{endpoint}/run")
        return HTMLResponse(await asyncio.to_thread(render, run))

    @api.get("/v1/monitors/{endpoint}/performance", summary="Measured and estimated performance over time")
    async def performance(endpoint: str, limit: int = Query(20, ge=1, le=500), page_token: str | None = None,
                          _: Principal = viewer) -> dict[str, Any]:
        await asyncio.to_thread(monitors.get, endpoint)
        items, nxt = await asyncio.to_thread(monitors.list_runs, endpoint, limit=limit, page_token=page_token,
                                             full=True)
        history = [{"run_id": r["id"], "window": r["window"], "model": r["model"], "model_version": r["model_version"],
                    "performance": r["performance"]} for r in items if r["status"] == "succeeded"]
        return {"latest": history[0] if history else None, "history": history, "next_page_token": nxt}

    @api.get("/v1/monitors/{endpoint}/loop", response_model=Page,
             summary="The closed loop: each retraining trigger and its chain (job, gates, challenger, rollout)")
    async def loop(endpoint: str, limit: int = Query(20, ge=1, le=200), page_token: str | None = None,
                   _: Principal = viewer) -> dict[str, Any]:
        items, nxt = await asyncio.to_thread(_loop().chain, endpoint, limit, page_token)
        return {"items": items, "next_page_token": nxt}

    @api.post("/v1/monitors/{endpoint}/retrain", status_code=202,
              summary="Trigger retraining now with the monitor's policy (the loop then runs as for any trigger)")
    async def retrain(endpoint: str, body: dict[str, Any] | None = Body(None), who: Principal = developer):
        monitor = await asyncio.to_thread(monitors.get, endpoint)
        _spec, _alerts, retraining = parse_monitor_spec(monitor["spec"])
        if retraining is None:
            raise InvalidInput(f"{endpoint!r}'s monitor has no retraining policy; PUT one first",
                               details={"field": "retraining"})
        reason = (body or {}).get("reason") or "manual"
        return await asyncio.to_thread(_loop().trigger_manual, endpoint, retraining, who.name, str(reason)[:500])

    @api.post("/v1/models/{name}/versions/{version}/profile", status_code=202, response_model=JobAccepted,
              summary="Compute a version's reference profile from a dataset (a reference_profile job)",
              description="Body: {dataset: a parquet/CSV URI under the data roots, target?: the label column "
              "(then the version's predictions on the rows are profiled too: prediction drift, CBPE), "
              "categorical?: [columns]}. Replaces the version's profile.")
    async def profile(name: str, version: str, body: dict[str, Any] = Body(...), who: Principal = developer):
        from app.storage.paths import check_job_location

        if not isinstance(body.get("dataset"), str) or not body["dataset"]:
            raise InvalidInput("dataset: a parquet or CSV URI is required", details={"field": "dataset"})
        if not version.isdigit():
            raise InvalidInput(f"version {version!r} is not a version number", details={"field": "version"})
        dataset = check_job_location(body["dataset"], ctx.settings, "dataset", must_exist=True)
        extra = set(body) - {"dataset", "target", "categorical"}
        if extra:
            raise InvalidInput(f"unknown fields {sorted(extra)}; the body takes dataset, target, categorical",
                               details={"field": sorted(extra)[0]})
        await asyncio.to_thread(ctx.registry.resolve, f"{name}/{version}", use_cache=False)  # 404 when it does not exist
        spec = {"model": name, "version": version, "dataset": dataset, "target": body.get("target"),
                "categorical": list(body.get("categorical") or [])}
        job = await asyncio.to_thread(ctx.store.create_job, PROFILE_KIND, f"profile-{name}-{version}", spec, who.name)
        await ctx.jobs.notify()
        return {"job_id": job["job_id"], "status": job["status"]}

    return api
