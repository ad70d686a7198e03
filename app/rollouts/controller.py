"""The RolloutController: creates, pauses, resumes and aborts canary rollouts, and on every
``tick()`` moves each running one on: it reads the step's window of the prediction log, judges
it (:func:`app.rollouts.judge.judge_step`) and records what it decided.

A rollout's life (``status``, ``step`` an index into ``spec.steps``):

- ``running`` at step ``i``: the endpoint's traffic plan sends ``steps[i]`` percent to the
  variant ``candidate`` (``model/<candidate>``), the rest to ``baseline`` (``model/<baseline>``).
  A failing guardrail rolls back; a pass moves to step ``i + 1`` with a new window
  (``step_started_at``); passing the last step below 100 starts the promotion. A step that
  waits past ``max_step_s`` pauses (or rolls back: ``on_timeout``).
- ``promoting``: the ``champion`` alias moves to the candidate and the version it held (the
  baseline when there was none) gets ``previous``; then the endpoint's target becomes
  ``model@champion`` and its plan goes: ``promoted``. The aliases live in MLflow, outside the
  store's transaction, so ``promoting`` is the durable intent: a controller that dies midway
  repeats the (idempotent) alias moves on its next tick.
- ``paused``: the split stays as it is and nothing is judged; resuming starts the step's
  window again (bake time and samples count anew).
- ``rolled_back``, ``aborted``, ``failed`` (it could not go on: the endpoint deleted, a version
  gone): the plan is removed and the endpoint serves the baseline again.

Every move is one transaction of :class:`app.rollouts.store.RolloutStore` with a
compare-and-set on (status, step): a controller killed and restarted, or two controllers at
once, resume from the stored step without skipping or repeating one. After a move the
``notify`` callback announces the changed endpoint (``endpoint:<name>``) and model names, so
every Gateway replica drops its cached row at once (the Gateway's RegistryCache feed).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from pydantic import ValidationError

from app.errors import Conflict, InvalidInput, NotFound
from app.events import model as m
from app.names import VERSION_PATTERN
from app.registry.targets import parse_target
from app.rollouts.judge import BASELINE, CANDIDATE, arms_from_table, judge_step
from app.rollouts.spec import RolloutSpec
from app.rollouts.store import RolloutStore
from app.serving.routing import endpoint_key
from app.traffic.spec import TrafficSpec

__all__ = ["RolloutController", "CONTROLLER_ACTOR", "traffic_plan"]

log = logging.getLogger(__name__)
CONTROLLER_ACTOR = "rollout-controller"  # the audit actor of the controller's own decisions
CHAMPION, PREVIOUS = "champion", "previous"


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def _parse(value: str) -> datetime:
    ts = datetime.fromisoformat(value)
    return ts.replace(tzinfo=timezone.utc) if ts.tzinfo is None else ts


def traffic_plan(model: str, baseline: str, candidate: str, percent: float) -> dict[str, Any]:
    """The traffic plan of a step: ``percent`` to the candidate, the rest to the baseline."""
    plan = TrafficSpec(variants=[
        {"name": BASELINE, "target": f"{model}/{baseline}", "weight": 100.0 - percent},
        {"name": CANDIDATE, "target": f"{model}/{candidate}", "weight": percent},
    ], strategy="fixed")
    return plan.model_dump(mode="json")


class RolloutController:
    """Plain Python over the metadata store, the registry service and the prediction log; the
    RolloutController actor (``actors/rollout_controller.py``) calls :meth:`tick` on a timer,
    the API (``app/api/rollouts.py``) the other methods.

    ``registry``: the :class:`app.registry.service.RegistryService` (its ``set_alias`` audits
    the alias moves as the registry API does); ``clock``: now, as an aware datetime;
    ``notify(key)``: announce a changed endpoint (``endpoint:<name>``) or model name."""

    def __init__(
        self, store, settings, registry, clock: Callable[[], datetime] | None = None, *,
        notify: Callable[[str], Any] | None = None,
    ):
        self.store = store
        self.settings = settings
        self.registry = registry
        self.clock = clock or _utc_now
        self.notify = notify
        self.rollouts = RolloutStore(store)

    # -- the API's side ----------------------------------------------------------------------------
    def create(self, body: RolloutSpec | dict[str, Any], actor: str) -> dict[str, Any]:
        """Start a rollout: resolve baseline and candidate to versions of the endpoint's model,
        put step 0's traffic plan on the endpoint. Conflict when one is in progress there."""
        try:
            spec = body if isinstance(body, RolloutSpec) else RolloutSpec.model_validate(body)
        except ValidationError as exc:
            raise InvalidInput(f"invalid rollout: {exc.errors()[0]['msg']}", details={"errors": exc.errors()}) from None
        endpoint = self.store.get_endpoint(spec.endpoint)
        logging_spec = (endpoint["spec"] or {}).get("logging") or {}
        if not self.settings.predlog.enabled or logging_spec.get("enabled") is False:
            raise Conflict(f"endpoint {spec.endpoint!r} does not log its predictions (predlog.enabled, "
                           "spec.logging.enabled), and a rollout judges its steps from that log; turn logging on first")
        target = endpoint["target"]
        model = parse_target(target).name
        current = str(self.registry.registry.resolve(target, use_cache=False).version)
        baseline = self._version(model, spec.baseline, "baseline") if spec.baseline else current
        candidate = self._version(model, spec.candidate, "candidate")
        if candidate == baseline:
            raise InvalidInput(f"the candidate {model}/{candidate} is the baseline; name another version",
                               details={"field": "candidate"})
        stored = {**spec.model_dump(mode="json"), "baseline": baseline, "candidate": candidate,
                  "target_before": target, "target_version": current}
        row = self.rollouts.create(endpoint=spec.endpoint, model=model, baseline=baseline, candidate=candidate,
                                   spec=stored, traffic=traffic_plan(model, baseline, candidate, spec.steps[0]),
                                   actor=actor, now=self.clock())
        self._announce(row["endpoint"])
        return row

    def _version(self, model: str, value: str, field: str) -> str:
        ref_text = f"{model}/{value}" if re.fullmatch(VERSION_PATTERN, value) else value
        ref = parse_target(ref_text)
        if ref.name != model:
            raise InvalidInput(f"the {field} {value!r} is not a version of the endpoint's model {model!r}; give a "
                               f"version number or a target of {model!r}", details={"field": field})
        return str(self.registry.registry.resolve(ref, use_cache=False).version)

    def get(self, rollout_id: str) -> dict[str, Any]:
        return self.rollouts.get(rollout_id)

    def list(self, endpoint: str | None = None, limit: int = 100, page_token: str | None = None):
        return self.rollouts.list(endpoint=endpoint, limit=limit, page_token=page_token)

    def pause(self, rollout_id: str, actor: str) -> dict[str, Any]:
        """Hold a running rollout where it is: the split stays, nothing is judged."""
        r = self.rollouts.get(rollout_id)
        if r["status"] != "running":
            raise Conflict(f"rollout {rollout_id} is {r['status']}; only a running rollout pauses")
        return self._must(self.rollouts.transition(
            rollout_id, expect=("running", r["step"]), actor=actor, action="rollout.pause", event=m.ROLLOUT_PAUSED,
            status="paused", error=f"paused by {actor}", now=self.clock()), rollout_id)

    def resume(self, rollout_id: str, actor: str) -> dict[str, Any]:
        """Run a paused rollout on: its step's window starts again now, and the step's plan is
        put back on the endpoint (in case it was changed meanwhile)."""
        r = self.rollouts.get(rollout_id)
        if r["status"] != "paused":
            raise Conflict(f"rollout {rollout_id} is {r['status']}; only a paused rollout resumes")
        now = self.clock()
        out = self._must(self.rollouts.transition(
            rollout_id, expect=("paused", r["step"]), actor=actor, action="rollout.resume", event=m.ROLLOUT_RESUMED,
            status="running", step_started_at=now, error="", now=now,
            traffic=traffic_plan(r["model"], r["baseline"], r["candidate"], r["percent"])), rollout_id)
        self._announce(out["endpoint"])
        return out

    def abort(self, rollout_id: str, actor: str) -> dict[str, Any]:
        """Stop a running or paused rollout: the plan goes, the endpoint serves the baseline."""
        r = self.rollouts.get(rollout_id)
        if r["status"] not in ("running", "paused"):
            raise Conflict(f"rollout {rollout_id} is {r['status']}; only a running or paused rollout aborts")
        now = self.clock()
        out = self._must(self.rollouts.transition(
            rollout_id, expect=(r["status"], r["step"]), actor=actor, action="rollout.abort", event=m.ROLLOUT_ABORTED,
            status="aborted", finished_at=now, error=f"aborted by {actor}", now=now, traffic=None,
            target=self._baseline_target(r)), rollout_id)
        self._announce(out["endpoint"])
        return out

    @staticmethod
    def _must(out: dict[str, Any] | None, rollout_id: str) -> dict[str, Any]:
        if out is None:
            raise Conflict(f"rollout {rollout_id} changed meanwhile (the controller moved it); read it and try again")
        return out

    # -- the controller's side ---------------------------------------------------------------------
    def tick(self) -> list[dict[str, Any]]:
        """Move every running (and half-promoted) rollout on once; returns the rollouts it
        changed. A rollout whose step fails to read or judge (the log briefly unreadable) is
        left for the next tick; the others go on."""
        moved = []
        token = None
        while True:
            items, token = self.rollouts.list(statuses=("running", "promoting"), limit=100, page_token=token)
            for r in items:
                try:
                    out = self.advance(r)
                except Exception:  # noqa: BLE001 - one rollout's trouble never stops the others
                    log.exception("rollout %s: tick failed; trying again next tick", r["id"])
                    continue
                if out is not None:
                    moved.append(out)
            if token is None:
                return moved

    def advance(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """One rollout's tick; returns it as it is after a move, None when nothing changed."""
        if r["status"] == "promoting":
            return self._promote(r)
        if r["status"] != "running":
            return None
        spec = RolloutSpec.model_validate({k: v for k, v in r["spec"].items() if k in RolloutSpec.model_fields})
        now = self.clock()
        try:
            endpoint = self.store.get_endpoint(r["endpoint"])
        except NotFound:
            return self._end(r, "failed", m.ROLLOUT_FAILED, "rollout.fail", now,
                             error=f"endpoint {r['endpoint']!r} was deleted", endpoint_gone=True)
        expected = traffic_plan(r["model"], r["baseline"], r["candidate"], r["percent"])
        if (endpoint["spec"] or {}).get("traffic") != expected:
            return self.rollouts.transition(
                r["id"], expect=("running", r["step"]), actor=CONTROLLER_ACTOR, action="rollout.pause",
                event=m.ROLLOUT_PAUSED, status="paused", now=now,
                error="the endpoint's traffic plan was changed outside the rollout; resume puts the step's plan back")
        started = _parse(r["step_started_at"])
        elapsed = (now - started).total_seconds()
        if elapsed <= 0:
            return None
        decision = judge_step(*self._arms(r, spec, started, now), spec, elapsed_s=elapsed)
        record = {"at": now.isoformat(), "step": r["step"], "percent": r["percent"], **decision.to_dict()}
        if decision.verdict == "fail":
            return self._end(r, "rolled_back", m.ROLLOUT_ROLLED_BACK, "rollout.rollback", now,
                             error="; ".join(decision.reasons), decision=record)
        if decision.verdict == "pass":
            return self._passed(r, spec, now, record)
        if elapsed > spec.max_step_s:
            reason = (f"step {r['step']} ({r['percent']:g}%) waited {elapsed:.0f} s, over max_step_s "
                      f"({spec.max_step_s:g} s): {'; '.join(decision.reasons)}")
            record = {**record, "verdict": "timeout", "reasons": [reason]}
            if spec.on_timeout == "rollback":
                return self._end(r, "rolled_back", m.ROLLOUT_ROLLED_BACK, "rollout.rollback", now, error=reason,
                                 decision=record)
            return self.rollouts.transition(
                r["id"], expect=("running", r["step"]), actor=CONTROLLER_ACTOR, action="rollout.pause",
                event=m.ROLLOUT_PAUSED, status="paused", error=reason, decision=record, now=now)
        return None

    def _arms(self, r: dict[str, Any], spec: RolloutSpec, since: datetime, until: datetime):
        from app.predlog.join import labeled, read_window

        if spec.quality is not None:
            table = labeled(self.settings, self.store, r["endpoint"], since, until, how="left")
        else:
            table = read_window(self.settings, r["endpoint"], since, until)
        arms = arms_from_table(table, spec.quality.metric if spec.quality else None)
        return arms[BASELINE], arms[CANDIDATE]

    def _passed(self, r: dict[str, Any], spec: RolloutSpec, now: datetime, record: dict) -> dict[str, Any] | None:
        nxt = r["step"] + 1
        if spec.steps[nxt] >= 100:  # the last step is the promotion itself
            out = self.rollouts.transition(
                r["id"], expect=("running", r["step"]), actor=CONTROLLER_ACTOR, action="rollout.step_passed",
                event=m.ROLLOUT_STEP_PASSED, status="promoting", step=nxt, step_started_at=now, decision=record,
                now=now)
            return self._promote(out) if out is not None else None
        out = self.rollouts.transition(
            r["id"], expect=("running", r["step"]), actor=CONTROLLER_ACTOR, action="rollout.step_passed",
            event=m.ROLLOUT_STEP_PASSED, step=nxt, step_started_at=now, decision=record, now=now,
            traffic=traffic_plan(r["model"], r["baseline"], r["candidate"], spec.steps[nxt]))
        if out is not None:
            self._announce(out["endpoint"])
        return out

    def _promote(self, r: dict[str, Any]) -> dict[str, Any] | None:
        """Move ``champion`` to the candidate (``previous`` to the version it held, or to the
        baseline), then the endpoint to ``model@champion`` without a plan. Repeatable."""
        model, candidate = r["model"], r["candidate"]
        now = self.clock()
        try:
            aliases = self.registry.get_model(model)["aliases"]
            held = aliases.get(CHAMPION)
            moved = {}
            if held is None or str(held) != candidate:
                previous = str(held) if held is not None else r["baseline"]
                self.registry.set_alias(model, PREVIOUS, previous, CONTROLLER_ACTOR)
                self.registry.set_alias(model, CHAMPION, candidate, CONTROLLER_ACTOR)
                moved = {CHAMPION: candidate, PREVIOUS: previous}
        except (Conflict, NotFound, InvalidInput) as exc:  # the candidate archived or deleted meanwhile
            return self._end(r, "failed", m.ROLLOUT_FAILED, "rollout.fail", now, expect_status="promoting",
                             error=f"promotion failed: {exc.message}")
        self.registry.registry.invalidate(model)
        if self.notify is not None:
            self._call_notify(model)
        record = {"at": now.isoformat(), "step": r["step"], "percent": 100.0, "verdict": "promoted",
                  "reasons": [f"every step passed: {model}@{CHAMPION} is version {candidate}"],
                  "stats": {"aliases": moved}}
        out = self.rollouts.transition(
            r["id"], expect=("promoting", r["step"]), actor=CONTROLLER_ACTOR, action="rollout.promote",
            event=m.ROLLOUT_PROMOTED, status="promoted", finished_at=now, decision=record, now=now, traffic=None,
            target=f"{model}@{CHAMPION}")
        if out is not None:
            self._announce(out["endpoint"])
        return out

    def _end(
        self, r: dict[str, Any], status: str, event: str, action: str, now: datetime, *, error: str,
        decision: dict | None = None, endpoint_gone: bool = False, expect_status: str = "running",
    ) -> dict[str, Any] | None:
        """Roll back, or give up: the plan removed and the endpoint on the baseline again."""
        kwargs: dict[str, Any] = {} if endpoint_gone else {"traffic": None, "target": self._baseline_target(r)}
        try:
            out = self.rollouts.transition(
                r["id"], expect=(expect_status, r["step"]), actor=CONTROLLER_ACTOR, action=action, event=event,
                status=status, finished_at=now, error=error[:4000], decision=decision, now=now, **kwargs)
        except NotFound:
            if endpoint_gone:
                raise
            return self._end(r, "failed", m.ROLLOUT_FAILED, "rollout.fail", now, expect_status=expect_status,
                             error=f"endpoint {r['endpoint']!r} was deleted", decision=decision, endpoint_gone=True)
        if out is not None and not endpoint_gone:
            self._announce(out["endpoint"])
        return out

    @staticmethod
    def _baseline_target(r: dict[str, Any]) -> str | None:
        """None (keep the target) when it served the baseline before the rollout; else the baseline."""
        spec = r["spec"]
        if str(spec.get("target_version")) == r["baseline"]:
            return None
        return f"{r['model']}/{r['baseline']}"

    def _announce(self, endpoint: str) -> None:
        if self.notify is not None:
            self._call_notify(endpoint_key(endpoint))

    def _call_notify(self, key: str) -> None:
        try:
            self.notify(key)
        except Exception:  # noqa: BLE001 - the replicas' caches expire on their own (serving.resolve_ttl_s)
            log.exception("announcing %s", key)

