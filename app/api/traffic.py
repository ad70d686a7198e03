"""Traffic plan routes: ``/v1/endpoints/{name}/traffic`` (weighted and sticky splits, shadows,
bandits; :mod:`app.traffic.spec`) and ``/v1/endpoints/{name}/shadow/report``.

A plan is part of the endpoint's spec, so setting it goes through the store's
``update_endpoint``: it bumps ``spec_version``, writes the audit record and the
``endpoint.updated`` event in one transaction, and the change feed pushes it to every Gateway
replica; nothing is redeployed. Every target is resolved before it is stored, as creating an
endpoint does, so a plan never names a model that is not there."""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import numpy as np
from fastapi import APIRouter, Query, Response

from app.api.app import ApiContext, _resolve, role_dependencies
from app.api.predlog import time_range
from app.auth import Principal
from app.ensembles.serving import check_ensemble_target
from app.errors import Conflict, DependencyUnavailable, InvalidInput, MatihError, NotFound
from app.predlog.feedback import FEEDBACK_SCHEMA, FeedbackStore
from app.predlog.join import read_window, window_feedback
from app.predlog.layout import shadow_log
from app.registry.mlflow_registry import model_metadata
from app.rollouts.store import ACTIVE, RolloutStore
from app.serving.endpoint_config import check_endpoint_config
from app.store import redacted_endpoint
from app.traffic.bandits import BanditStore
from app.traffic.choice import bandit_weights
from app.traffic.shadow import shadow_report
from app.traffic.spec import BANDITS, TrafficSpec



def _plan_of(endpoint: dict[str, Any]) -> dict[str, Any] | None:
    plan = (endpoint.get("spec") or {}).get("traffic")
    return plan if isinstance(plan, dict) else None


def arms_to_reset(old: dict[str, Any] | None, new: TrafficSpec | None) -> list[str] | None:
    """The bandit arms whose rewards no longer describe what they serve: variants that are new,
    serve another target or are gone. None = every arm (the plan goes, or a bandit starts where
    there was none, so no arm's rewards were kept current)."""
    if new is None or old is None or old.get("strategy") not in BANDITS:
        return None
    before: dict[str, Any] = {
        str(v.get("name")): v.get("target") for v in old.get("variants") or () if isinstance(v, dict)
    }
    after = {v.name: v.target for v in new.variants}
    gone = [name for name in before if name not in after]
    changed = [name for name, target in after.items() if before.get(name) != target]
    return sorted({*gone, *changed})


def router(ctx: ApiContext) -> APIRouter:
    viewer, _predictor, developer, _admin = role_dependencies(ctx)
    api = APIRouter(prefix="/v1/endpoints/{name}", tags=["traffic"])
    bandits = BanditStore(ctx.store)
    rollouts = RolloutStore(ctx.store)
    feedback = FeedbackStore(ctx.store)

    async def check_targets(plan: TrafficSpec, endpoint: dict[str, Any]) -> None:
        """Every variant and shadow target resolves to a servable version, and a leg that names
        its own runtime has a config that runtime takes (a leg without one runs with the
        endpoint's runtime and config): 422 naming the field otherwise."""
        legs = [(f"variants[{i}]", v) for i, v in enumerate(plan.variants)]
        legs += [(f"shadows[{i}]", s) for i, s in enumerate(plan.shadows)]
        for where, leg in legs:
            config = endpoint["config"]
            if leg.runtime is not None:
                config = leg.config or {}
                try:
                    check_endpoint_config(leg.runtime, config, ctx.settings)
                except InvalidInput as exc:
                    field = str(exc.details.get("field") or "runtime")
                    field = field if field.startswith(("config", "runtime")) else "config." + field
                    raise InvalidInput(f"{where}.runtime {leg.runtime!r}: {exc.message}",
                                       details={**exc.details, "field": f"{where}.{field}"}) from None
            try:
                resolved = await _resolve(ctx, leg.target, use_cache=False)
                check_ensemble_target(resolved, config)
            except (InvalidInput, NotFound) as exc:
                raise InvalidInput(f"{where}.target {leg.target!r}: {exc.message}",
                                   details={**exc.details, "field": f"{where}.target"}) from None

    async def refuse_during_rollout(name: str) -> None:
        """A rollout in progress owns the endpoint's plan (app.rollouts): 409 naming it."""
        active, _ = await asyncio.to_thread(rollouts.list, endpoint=name, statuses=ACTIVE, limit=1)
        if active:
            rid = active[0]["id"]
            raise Conflict(
                f"endpoint {name!r} is in rollout {rid} ({active[0]['status']}), which sets its traffic plan; "
                f"POST /v1/rollouts/{rid}/abort first",
                details={"rollout": rid},
            )

    def verify(plan: TrafficSpec):
        """Run again inside the update's transaction: a model deleted meanwhile fails the change."""
        targets = sorted({v.target for v in plan.variants} | {s.target for s in plan.shadows})
        return lambda: [ctx.registry.resolve(t, use_cache=False) for t in targets]

    async def store_plan(name: str, endpoint: dict[str, Any], plan: TrafficSpec | None, actor: str) -> dict[str, Any]:
        spec = dict(endpoint.get("spec") or {})
        if plan is None:
            spec.pop("traffic", None)
        else:
            spec["traffic"] = plan.model_dump(mode="json")
        guard = {} if plan is None else {"verify": verify(plan)}
        row = await asyncio.to_thread(ctx.store.update_endpoint, name, {"spec": spec}, actor, **guard)
        reset = arms_to_reset(_plan_of(endpoint), plan)
        await asyncio.to_thread(bandits.reset, name, reset)
        await ctx.notify_endpoint_changed(name)
        return row

    @api.put(
        "/traffic",
        summary="Set the endpoint's traffic plan: weighted or sticky split, shadows, bandit (developer)",
        description="The plan replaces the endpoint's current one (none: the endpoint's target serves every "
        "request). Every variant's and shadow's target must resolve to a servable version (422 naming the field "
        "otherwise; 404 for an unknown endpoint). Stored in the endpoint's spec (spec_version counts up), audited, "
        "and pushed to every Gateway replica; nothing is redeployed. A bandit's arms start afresh for variants "
        "that are new or serve another target (all of them when the strategy becomes a bandit).",
    )
    async def put_traffic(name: str, body: TrafficSpec, who: Principal = developer) -> dict[str, Any]:
        endpoint = await asyncio.to_thread(ctx.store.get_endpoint, name)
        await refuse_during_rollout(name)
        await check_targets(body, endpoint)
        return redacted_endpoint(await store_plan(name, endpoint, body, who.name))

    @api.delete(
        "/traffic", status_code=204,
        summary="Remove the endpoint's traffic plan: its target serves every request again (developer)",
    )
    async def delete_traffic(name: str, who: Principal = developer) -> Response:
        endpoint = await asyncio.to_thread(ctx.store.get_endpoint, name)
        if _plan_of(endpoint) is not None:
            await refuse_during_rollout(name)
            await store_plan(name, endpoint, None, who.name)
        return Response(status_code=204)

    @api.get(
        "/traffic",
        summary="The endpoint's traffic plan, with its bandit arms and their current shares",
        description="`shares`: each variant's configured share of the traffic. For a bandit strategy, `arms`: each "
        "variant's rewards so far (n, sum, mean, variance) and `bandit_shares`: the share each gets now (floors "
        "applied). 404 when the endpoint has no plan.",
    )
    async def get_traffic(name: str, _: Principal = viewer) -> dict[str, Any]:
        endpoint = await asyncio.to_thread(ctx.store.get_endpoint, name)
        raw = _plan_of(endpoint)
        if raw is None:
            raise NotFound(f"endpoint {name!r} has no traffic plan; PUT /v1/endpoints/{name}/traffic sets one")
        plan = TrafficSpec.model_validate(raw)
        out: dict[str, Any] = {
            "endpoint": name, "spec_version": endpoint["spec_version"], "traffic": plan.model_dump(mode="json"),
            "shares": plan.weights(),
        }
        if plan.strategy in BANDITS:
            arms = await asyncio.to_thread(bandits.arms, name)
            names = [v.name for v in plan.variants]
            out["arms"] = {v: (arms[v].to_dict() if v in arms else None) for v in names}
            out["bandit_shares"] = bandit_weights(plan.strategy, arms, names, plan.bandit, rng=np.random.default_rng())
        return out

    @api.get(
        "/shadow/report",
        summary="Shadows compared with the primary answers on the same requests",
        description="For the predictions logged in since..until (ISO 8601; default the last 24 hours; at most 31 "
        "days), each shadow's answers paired with the primary's for the same request and row: `agreement` "
        "(same prediction), `mean_abs_diff` / `max_abs_diff` (numeric predictions), latency p50/p95/mean and "
        "error rate (status >= 500) of both, and, on the pairs whose feedback arrived, the quality metric of both "
        "(accuracy for classification, rmse/mae for regression). `task`: unset = the primary target's task tag, "
        "else inferred from the predictions.",
    )
    async def shadow_report_route(
        name: str,
        since: str | None = Query(None, max_length=64, description="Start of the range (ISO 8601), inclusive."),
        until: str | None = Query(None, max_length=64, description="End of the range (ISO 8601), exclusive."),
        task: Literal["classification", "regression"] | None = Query(None, description="How to compare answers."),
        _: Principal = viewer,
    ) -> dict[str, Any]:
        start, end = time_range(since, until)
        endpoint = await asyncio.to_thread(ctx.store.get_endpoint, name)
        if task is None:
            try:
                declared = model_metadata(await _resolve(ctx, endpoint["target"]))["task"]
                task = declared if declared in ("classification", "regression") else None
            except MatihError:
                task = None  # the target may be gone while its log remains: infer from the predictions

        def build() -> dict[str, Any]:
            primary = read_window(ctx.settings, name, start, end)
            shadows = read_window(ctx.settings, shadow_log(name), start, end)
            labels = (
                window_feedback(feedback, name, start, end)
                if primary.num_rows and shadows.num_rows else FEEDBACK_SCHEMA.empty_table()
            )
            return shadow_report(primary, shadows, task=task, feedback=labels)

        try:
            report = await asyncio.to_thread(build)
        except OSError as exc:
            raise DependencyUnavailable(
                f"the prediction log's storage is not readable: {type(exc).__name__}: {exc}"[:500]
            ) from None
        plan = _plan_of(endpoint)
        configured = [s.label for s in TrafficSpec.model_validate(plan).shadows] if plan is not None else []
        return {"endpoint": name, "since": start.isoformat(), "until": end.isoformat(),
                "configured_shadows": configured, **report}

    return api
