"""A/B tests as a service: checking a test against its endpoint's traffic plan, storing it, and
analysing the endpoint's prediction log (joined with feedback) over the test's window.

The window is ``[spec.since or created_at, stopped_at or now)``: a stopped test's analysis no
longer changes. Every analysis is computed from the log afresh (nothing incremental to drift)
and its result is kept on the row as the test's latest verdict."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
from pydantic import ValidationError

from app.errors import Conflict, InvalidInput, NotFound
from app.experiments.analysis import analyze, timeline
from app.experiments.spec import ABTestSpec
from app.experiments.store import ABTestStore
from app.predlog.join import labeled
from app.predlog.layout import SCHEMA
from app.traffic.spec import TrafficSpec

__all__ = ["ABTestService", "Window"]


@dataclass(frozen=True)
class Window:
    """What one analysis reads: the test, its spec, the plan's weights and the joined log."""

    test: dict[str, Any]
    spec: ABTestSpec
    weights: dict[str, float]
    since: datetime
    until: datetime
    table: pa.Table


def _plan(endpoint: dict[str, Any]) -> TrafficSpec | None:
    traffic = (endpoint.get("spec") or {}).get("traffic")
    return None if not traffic else TrafficSpec.model_validate(traffic)


def _check_plan(spec: ABTestSpec, endpoint: dict[str, Any]) -> tuple[TrafficSpec, str]:
    """The endpoint's plan and the test's control, or why the plan cannot carry the test."""
    name = endpoint["name"]
    plan = _plan(endpoint)
    if plan is None:
        raise Conflict(f"endpoint {name!r} has no traffic plan; PUT /v1/endpoints/{name}/traffic with two or more "
                       "variants first", details={"field": "endpoint"})
    if plan.strategy != "fixed":
        raise Conflict(f"endpoint {name!r} routes by the bandit strategy {plan.strategy!r}, which moves traffic by "
                       "the outcomes it sees: an A/B test needs a fixed split (strategy 'fixed')",
                       details={"field": "endpoint"})
    live = [v.name for v in plan.variants if v.weight > 0]
    if len(live) < 2:
        raise Conflict(f"endpoint {name!r}'s traffic plan sends traffic to {len(live)} variant(s) ({live}); an A/B "
                       "test needs at least two with a positive weight", details={"field": "endpoint"})
    control = spec.control or plan.variants[0].name
    if control not in live:
        raise InvalidInput(f"control {control!r} is not a variant with traffic in endpoint {name!r}'s plan; choose "
                           f"one of {live}", details={"field": "control"})
    return plan, control


class ABTestService:
    """A/B tests over the metadata store and the prediction log of ``settings``."""

    def __init__(self, store, settings):
        self.store = store
        self.settings = settings
        self.tests = ABTestStore(store)

    def create(self, spec: ABTestSpec | dict[str, Any], actor: str) -> dict[str, Any]:
        """Check ``spec`` against its endpoint's traffic plan and store it running: 422 for an
        unknown endpoint or a control outside the plan, 409 when the endpoint has no fixed split
        of two or more variants. The stored spec names its control."""
        if not isinstance(spec, ABTestSpec):
            try:
                spec = ABTestSpec.model_validate(spec)
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first.get("loc", ())) or "body"
                raise InvalidInput(f"{where}: {first.get('msg')}", details={"field": where}) from None
        try:
            endpoint = self.store.get_endpoint(spec.endpoint)
        except NotFound:
            raise InvalidInput(f"endpoint {spec.endpoint!r} does not exist; GET /v1/endpoints lists the endpoints",
                               details={"field": "endpoint"}) from None
        _, control = _check_plan(spec, endpoint)
        body = spec.model_copy(update={"control": control}).model_dump(mode="json")
        return self.tests.create(spec.name, spec.endpoint, body, actor)

    def get(self, test_id: str) -> dict[str, Any]:
        return self.tests.get(test_id)

    def list(self, endpoint: str | None = None, limit: int = 50,
             page_token: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
        return self.tests.list(endpoint, limit, page_token)

    def stop(self, test_id: str, actor: str) -> dict[str, Any]:
        return self.tests.stop(test_id, actor)

    def window(self, test_id: str, *, now: datetime | None = None) -> Window:
        """The test, the plan's current weights and the joined log of its window."""
        test = self.tests.get(test_id)
        spec = ABTestSpec.model_validate(test["spec"])
        endpoint = self.store.get_endpoint(spec.endpoint)
        try:
            plan, _ = _check_plan(spec, endpoint)
        except InvalidInput as exc:  # the request is fine; the plan moved under the test
            raise Conflict(f"the traffic plan of endpoint {spec.endpoint!r} changed since the test began: "
                           f"{exc.message}") from None
        now = now or datetime.now(timezone.utc)
        since = spec.since or datetime.fromisoformat(test["created_at"])
        until = datetime.fromisoformat(test["stopped_at"]) if test["stopped_at"] else now
        if until > since:
            table = labeled(self.settings, self.store, spec.endpoint, since, until, how="left")
        else:  # a test whose start is still ahead
            table = SCHEMA.empty_table()
        return Window(test=test, spec=spec, weights=plan.weights(), since=since, until=until, table=table)

    def analysis(self, test_id: str, *, now: datetime | None = None) -> dict[str, Any]:
        """The analysis (:func:`app.experiments.analysis.analyze`) of the test's window now; kept
        on the row as its latest result."""
        now = now or datetime.now(timezone.utc)
        w = self.window(test_id, now=now)
        result = self._analyse(w, now)
        self.tests.set_result(test_id, result)
        return result

    def _analyse(self, w: Window, now: datetime) -> dict[str, Any]:
        result = analyze(w.spec, w.weights, w.table, now=now, since=w.since, until=w.until)
        return {"id": w.test["id"], "name": w.test["name"], "endpoint": w.test["endpoint"], "status": w.test["status"],
                "window": {"since": w.since.isoformat(), "until": w.until.isoformat()}, **result}

    def report(self, test_id: str, *, now: datetime | None = None) -> str:
        """The test's HTML report: the analysis, the metric per arm over time and the mSPRT
        confidence sequence of each treatment."""
        from app.experiments.report import render

        now = now or datetime.now(timezone.utc)
        w = self.window(test_id, now=now)
        result = self._analyse(w, now)
        self.tests.set_result(test_id, result)
        series = timeline(w.spec, w.weights, w.table, since=w.since, until=w.until)
        return render(w.test, result, series)
