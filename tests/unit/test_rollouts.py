"""Canary rollouts: the step judge on seeded synthetic traffic, and the controller's state
machine with a fake clock over a real metadata store (SQLite; PostgreSQL with the ``postgres``
param), a real MLflow registry (SQLite) and a real prediction log (parquet files written by
the PredictionLogService, read back by the controller)."""

from __future__ import annotations

from datetime import datetime, timezone

import numpy as np
import pytest

from tests.support import Clock

from app.errors import Conflict, InvalidInput
from app.predlog.ids import new_request_id
from app.predlog.records import PredictionRecord
from app.rollouts.judge import Arm, arms_from_table, judge_step
from app.rollouts.spec import RolloutSpec

RNG_SEED = 20261204


def _spec(**kw) -> RolloutSpec:
    return RolloutSpec(endpoint="ep", candidate="2", **kw)


def _arm(rng, n, *, err=0.0, base_ms=5.0, shift_ms=0.0, scale_ms=1.0, quality=None) -> Arm:
    latency = base_ms + shift_ms + rng.gamma(2.0, scale_ms / 2.0, n)
    status = np.where(rng.random(n) < err, 500, 200)
    return Arm(latency, status, np.asarray(quality if quality is not None else [], dtype=float))


# -- the judge --------------------------------------------------------------------------------------
def test_ten_times_the_error_rate_fails_at_once_before_bake_time_and_min_samples():
    rng = np.random.default_rng(RNG_SEED)
    spec = _spec()  # bake 60 s, 100 samples per arm: neither reached
    decision = judge_step(_arm(rng, 950, err=0.02), _arm(rng, 50, err=0.2), spec, elapsed_s=5)
    assert decision.verdict == "fail", decision
    err = decision.stats["error_rate"]
    assert err["failed"] and err["method"].startswith("msprt") and err["p_value"] < spec.alpha
    assert "error rate" in decision.reasons[0]


def test_the_same_error_rate_waits_then_passes():
    rng = np.random.default_rng(RNG_SEED)
    spec = _spec()
    early = judge_step(_arm(rng, 950, err=0.02), _arm(rng, 50, err=0.02), spec, elapsed_s=5)
    assert early.verdict == "wait" and any("baking" in r for r in early.reasons)
    done = judge_step(_arm(rng, 1900, err=0.02), _arm(rng, 200, err=0.02), spec, elapsed_s=61)
    assert done.verdict == "pass", done
    assert done.stats["error_rate"]["method"].startswith("two_proportion_ztest")
    assert done.stats["latency"]["method"].startswith("mann_whitney")


def test_latency_floors_5_to_10_ms_passes_50_to_75_ms_and_plus_20_ms_fail():
    rng = np.random.default_rng(RNG_SEED)
    spec = _spec()  # relative 0.2, absolute 10 ms
    assert (spec.latency_rel_floor, spec.latency_abs_floor_ms) == (0.2, 10.0)
    small = judge_step(_arm(rng, 900, base_ms=4.5), _arm(rng, 300, base_ms=9.5), spec, elapsed_s=120)
    lat = small.stats["latency"]
    assert lat["significant"] and 4 < lat["shift_ms"] < 6 and not lat["failed"]  # significant, under 10 ms
    assert small.verdict == "pass", small
    slow = judge_step(_arm(rng, 900, base_ms=49.5), _arm(rng, 300, base_ms=74.5), spec, elapsed_s=120)
    assert slow.verdict == "fail" and slow.stats["latency"]["failed"], slow
    assert 24 < slow.stats["latency"]["shift_ms"] < 26 and slow.stats["latency"]["floor_ms"] == pytest.approx(10, rel=0.05)
    plus20 = judge_step(_arm(rng, 900, base_ms=4.5), _arm(rng, 300, base_ms=24.5), spec, elapsed_s=120)
    assert plus20.verdict == "fail" and "latency" in plus20.reasons[0]


def test_a_latency_regression_before_the_end_of_the_step_needs_the_always_valid_test():
    rng = np.random.default_rng(RNG_SEED)
    decision = judge_step(_arm(rng, 400, base_ms=4.5), _arm(rng, 40, base_ms=24.5), _spec(), elapsed_s=10)
    assert decision.verdict == "fail" and decision.stats["latency"]["method"].startswith("msprt")


def test_a_aa_comparison_rarely_fails_a_step():
    """100 seeded A/A steps, each looked at 9 times before its end (always-valid, alpha/2) and
    once at it (fixed-horizon, alpha/2): false failures stay near alpha = 5%."""
    rng = np.random.default_rng(RNG_SEED)
    spec = _spec(min_samples=50)
    failures = 0
    for _ in range(100):
        a, b = _arm(rng, 1000, err=0.05), _arm(rng, 100, err=0.05)
        verdicts = [judge_step(Arm(a.latency_ms[: 100 * k], a.status[: 100 * k]),
                               Arm(b.latency_ms[: 10 * k], b.status[: 10 * k]), spec, elapsed_s=6 * k).verdict
                    for k in range(1, 11)]
        failures += "fail" in verdicts
    assert failures <= 10, failures  # 5% + simulation error (binomial sd 2.2%); seeded: 5 of these 100


def test_a_worse_quality_metric_fails_with_msprt_and_rmse_is_lower_is_better():
    rng = np.random.default_rng(RNG_SEED)
    spec = _spec(quality={"metric": "accuracy"})
    good, bad = (rng.random(600) < 0.9).astype(float), (rng.random(600) < 0.7).astype(float)
    d = judge_step(_arm(rng, 600, quality=good), _arm(rng, 600, quality=bad), spec, elapsed_s=10)
    assert d.verdict == "fail" and d.stats["quality"]["failed"] and "accuracy" in d.reasons[0]
    better = judge_step(_arm(rng, 600, quality=bad), _arm(rng, 600, quality=good), spec, elapsed_s=100)
    assert better.verdict == "pass"
    rmse = _spec(quality={"metric": "rmse"})
    d = judge_step(_arm(rng, 600, quality=rng.normal(0, 1, 600) ** 2),
                   _arm(rng, 600, quality=rng.normal(0, 2, 600) ** 2), rmse, elapsed_s=100)
    assert d.verdict == "fail" and d.stats["quality"]["candidate"] > d.stats["quality"]["baseline"]


def test_required_quality_waits_for_labels():
    rng = np.random.default_rng(RNG_SEED)
    spec = _spec(quality={"metric": "conversion", "required": True}, min_samples=50)
    d = judge_step(_arm(rng, 600, quality=[1, 0] * 10), _arm(rng, 600, quality=[1, 0] * 10), spec, elapsed_s=100)
    assert d.verdict == "wait" and "labeled" in d.reasons[0]


def test_the_spec_checks_its_steps():
    assert _spec().steps == [5, 25, 50, 100]
    for bad in ([100], [5, 5, 100], [0, 100], [10, 50]):
        with pytest.raises(ValueError):
            _spec(steps=bad)
    with pytest.raises(ValueError):
        RolloutSpec(endpoint="ep", candidate="2", nope=1)


def test_decisions_are_json():
    import json

    rng = np.random.default_rng(RNG_SEED)
    d = judge_step(_arm(rng, 300), _arm(rng, 300), _spec(), elapsed_s=100)
    json.dumps(d.to_dict(), allow_nan=False)


# -- the controller ---------------------------------------------------------------------------------
T0 = datetime(2026, 12, 1, 10, 0, tzinfo=timezone.utc)


@pytest.fixture
def env(store, tmp_path):
    from app.predlog.service import PredictionLogService
    from app.registry.mlflow_registry import ModelRegistry
    from app.registry.service import RegistryService
    from app.settings import load_settings
    from tests.unit.test_registry_api import onnx_bytes

    settings = load_settings("local", matih_home=str(tmp_path / "home"), database_url=store.url,
                             mlflow_tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    settings.matih_home.mkdir(parents=True, exist_ok=True)
    svc = RegistryService(settings, ModelRegistry(settings), store)
    for _ in range(2):
        svc.register_upload("m", "onnx", onnx_bytes(), "dev")
    svc.set_alias("m", "champion", "1", "dev")
    store.create_endpoint("ep", "m@champion", "onnx", {}, "dev")

    class Env:
        pass

    e = Env()
    e.store, e.settings, e.svc, e.clock = store, settings, svc, Clock(T0)
    e.log = PredictionLogService(settings)
    e.notified = []
    e.ctl = lambda: _controller(e)
    e.rng = np.random.default_rng(RNG_SEED)
    return e


def _controller(e):
    from app.rollouts.controller import RolloutController

    return RolloutController(e.store, e.settings, e.svc, e.clock, notify=e.notified.append)


def _traffic(e, seconds: float, n: int, share: float, *, err_b=0.0, err_c=0.0, shift_ms=0.0, pct=None):
    """``n`` requests over the next ``seconds`` of the fake clock, ``share`` of them to the
    candidate, logged as the Gateway logs them; the clock ends at the window's end."""
    start = e.clock.t.timestamp()
    records = []
    for i in range(n):
        ts = start + (i + 0.5) * seconds / n
        cand = e.rng.random() < share
        err = err_c if cand else err_b
        status = 500 if e.rng.random() < err else 200
        latency = 5.0 + (shift_ms if cand else 0.0) + float(e.rng.gamma(2.0, 0.5))
        records.append(PredictionRecord(new_request_id(ts), ts, "ep", "candidate" if cand else "baseline", "m",
                                        "2" if cand else "1", latency,
                                        outputs={"predictions": [0]} if status == 200 else None, status=status))
    e.log.write(records)
    e.log.flush()
    e.clock.advance(seconds)


def _plan(e):
    traffic = e.store.get_endpoint("ep")["spec"].get("traffic")
    return None if traffic is None else {v["name"]: v["weight"] for v in traffic["variants"]}


def _events(e):
    from sqlalchemy import select

    from app.store.models import Event

    with e.store._tx() as s:
        return [(r.type, r.data) for r in s.scalars(select(Event).order_by(Event.id))
                if r.type.startswith("rollout.")]


SMALL = {"endpoint": "ep", "candidate": "2", "steps": [10, 50, 100], "bake_s": 10, "min_samples": 50}


def test_a_good_candidate_goes_through_every_step_and_is_promoted(env):
    ctl = env.ctl()
    r = ctl.create(SMALL, "dev")
    assert (r["status"], r["step"], r["baseline"], r["candidate"], r["model"]) == ("running", 0, "1", "2", "m")
    assert _plan(env) == {"baseline": 90, "candidate": 10} and "endpoint:ep" in env.notified
    assert ctl.tick() == []  # no traffic yet: waits
    _traffic(env, 20, 1000, 0.10)
    [r] = ctl.tick()
    assert (r["status"], r["step"]) == ("running", 1) and _plan(env) == {"baseline": 50, "candidate": 50}
    assert r["decisions"][-1]["verdict"] == "pass" and r["decisions"][-1]["stats"]["error_rate"] is not None
    _traffic(env, 20, 400, 0.5)
    [r] = ctl.tick()
    assert r["status"] == "promoted" and r["finished_at"]
    ep = env.store.get_endpoint("ep")
    assert ep["target"] == "m@champion" and "traffic" not in ep["spec"]
    aliases = env.svc.get_model("m")["aliases"]
    assert str(aliases["champion"]) == "2" and str(aliases["previous"]) == "1"
    assert [t for t, _ in _events(env)] == ["rollout.started", "rollout.step_passed", "rollout.step_passed",
                                            "rollout.promoted"]
    passed = _events(env)[1][1]
    assert passed["decision"]["stats"]["latency"]["method"].startswith("mann_whitney")
    audits = [a["action"] for a in env.store.list_audit(limit=100, resource_type="rollout")[0]]
    assert sorted(audits) == sorted(["rollout.create", "rollout.step_passed", "rollout.step_passed",
                                     "rollout.promote"])
    assert ctl.tick() == []  # done


def test_ten_times_the_errors_roll_back_in_the_first_step(env):
    ctl = env.ctl()
    ctl.create({**SMALL, "bake_s": 60, "min_samples": 200}, "dev")
    _traffic(env, 5, 1000, 0.10, err_b=0.02, err_c=0.2)
    [r] = ctl.tick()
    assert r["status"] == "rolled_back" and r["step"] == 0 and "error rate" in r["error"]
    assert r["decisions"][-1]["verdict"] == "fail"
    ep = env.store.get_endpoint("ep")
    assert ep["target"] == "m@champion" and "traffic" not in ep["spec"]
    assert str(env.svc.get_model("m")["aliases"]["champion"]) == "1"
    assert _events(env)[-1][0] == "rollout.rolled_back"
    assert _events(env)[-1][1]["decision"]["stats"]["error_rate"]["failed"] is True


def test_a_candidate_20_ms_slower_is_rolled_back_on_latency(env):
    ctl = env.ctl()
    ctl.create(SMALL, "dev")
    _traffic(env, 20, 1000, 0.10, shift_ms=20)
    [r] = ctl.tick()
    assert r["status"] == "rolled_back" and "latency" in r["error"], r


def test_a_restarted_controller_resumes_at_the_stored_step_and_cas_stops_a_double_advance(env):
    from app.store import MetadataStore

    first = env.ctl()
    r = first.create(SMALL, "dev")
    _traffic(env, 20, 1000, 0.10)
    stale = first.get(r["id"])  # what two controllers both read
    moved = first.advance(stale)
    assert moved["step"] == 1
    assert first.advance(stale) is None  # the second writer's compare-and-set finds step 1
    # "killed": a new controller over a new store object on the same database
    env.store = MetadataStore(env.store.url)
    second = env.ctl()
    assert second.get(r["id"])["step"] == 1 and second.tick() == []  # step 1's window is new: waits
    assert [d["step"] for d in second.get(r["id"])["decisions"]] == [0]  # step 0 judged once
    _traffic(env, 20, 400, 0.5)
    [done] = second.tick()
    assert done["status"] == "promoted" and [d["step"] for d in done["decisions"]] == [0, 1, 2]
    env.store.dispose()


def test_a_controller_dead_midway_through_the_promotion_finishes_it(env):
    ctl = env.ctl()
    r = ctl.create(SMALL, "dev")
    from app.events import model as m

    # the state a controller leaves when it dies right after the step passed and previous moved
    ctl.rollouts.transition(r["id"], expect=("running", 0), actor="t", action="rollout.step_passed",
                            event=m.ROLLOUT_STEP_PASSED, status="promoting", step=2, now=env.clock())
    env.svc.set_alias("m", "previous", "1", "dev")
    [done] = env.ctl().tick()
    assert done["status"] == "promoted"
    aliases = env.svc.get_model("m")["aliases"]
    assert (str(aliases["champion"]), str(aliases["previous"])) == ("2", "1")


def test_pause_resume_abort(env):
    ctl = env.ctl()
    r = ctl.create(SMALL, "dev")
    paused = ctl.pause(r["id"], "dev")
    assert paused["status"] == "paused" and _plan(env) == {"baseline": 90, "candidate": 10}  # the split stays
    _traffic(env, 20, 1000, 0.10, err_c=0.5)
    assert ctl.tick() == []  # paused: nothing is judged
    with pytest.raises(Conflict):
        ctl.pause(r["id"], "dev")
    resumed = ctl.resume(r["id"], "dev")
    assert resumed["status"] == "running" and resumed["step_started_at"] == env.clock().isoformat()
    assert resumed["error"] is None
    assert ctl.tick() == []  # the bad traffic came before the window started again
    aborted = ctl.abort(r["id"], "dev")
    assert aborted["status"] == "aborted" and _plan(env) is None
    with pytest.raises(Conflict):
        ctl.resume(r["id"], "dev")
    assert [t for t, _ in _events(env)] == ["rollout.started", "rollout.paused", "rollout.resumed",
                                            "rollout.aborted"]


def test_one_rollout_per_endpoint_and_none_over_a_plan_of_its_own(env):
    ctl = env.ctl()
    r = ctl.create(SMALL, "dev")
    with pytest.raises(Conflict, match="in progress|traffic plan"):
        ctl.create(SMALL, "dev")
    ctl.abort(r["id"], "dev")
    traffic = {"variants": [{"name": "a", "target": "m/1", "weight": 1}]}
    env.store.update_endpoint("ep", {"spec": {**env.store.get_endpoint("ep")["spec"], "traffic": traffic}}, "dev")
    with pytest.raises(Conflict, match="traffic plan"):
        ctl.create(SMALL, "dev")


def test_a_plan_changed_by_hand_pauses_the_rollout_and_resume_puts_it_back(env):
    ctl = env.ctl()
    r = ctl.create(SMALL, "dev")
    spec = env.store.get_endpoint("ep")["spec"]
    spec["traffic"]["variants"][1]["weight"] = 50
    env.store.update_endpoint("ep", {"spec": spec}, "dev")
    [paused] = ctl.tick()
    assert paused["status"] == "paused" and "outside the rollout" in paused["error"]
    ctl.resume(r["id"], "dev")
    assert _plan(env) == {"baseline": 90, "candidate": 10}


def test_a_step_without_enough_traffic_pauses_after_max_step_s(env):
    ctl = env.ctl()
    r = ctl.create({**SMALL, "max_step_s": 60}, "dev")
    _traffic(env, 61, 20, 0.10)
    [paused] = ctl.tick()
    assert paused["status"] == "paused" and "max_step_s" in paused["error"]
    assert paused["decisions"][-1]["verdict"] == "timeout"
    r2 = ctl.abort(r["id"], "dev")
    r3 = ctl.create({**SMALL, "max_step_s": 60, "on_timeout": "rollback"}, "dev")
    _traffic(env, 61, 20, 0.10)
    [back] = ctl.tick()
    assert back["id"] == r3["id"] and back["status"] == "rolled_back" and r2["status"] == "aborted"


def test_create_checks_the_versions(env):
    ctl = env.ctl()
    with pytest.raises(InvalidInput, match="is the baseline"):
        ctl.create({**SMALL, "candidate": "1"}, "dev")
    with pytest.raises(InvalidInput, match="not a version of"):
        ctl.create({**SMALL, "candidate": "other/2"}, "dev")
    r = ctl.create({**SMALL, "candidate": "m/2", "baseline": "m@champion"}, "dev")
    assert (r["baseline"], r["candidate"]) == ("1", "2")
    items, _ = ctl.list(endpoint="ep")
    assert [i["id"] for i in items] == [r["id"]]


def test_arms_from_a_logged_window(env):
    from app.predlog.join import read_window

    _traffic(env, 10, 200, 0.5, err_c=0.5)
    table = read_window(env.settings, "ep", T0, env.clock())
    arms = arms_from_table(table)
    assert arms["baseline"].requests + arms["candidate"].requests == 200
    assert arms["candidate"].errors > 20 and arms["baseline"].errors == 0


# -- the routes -------------------------------------------------------------------------------------
def test_the_rollout_routes(tmp_path):
    from fastapi.testclient import TestClient

    from app.api.app import create_app
    from app.bootstrap import prepare
    from app.registry.service import RegistryService
    from app.settings import load_settings
    from tests.support import NoJobs, in_process_context
    from tests.unit.test_registry_api import onnx_bytes

    settings = load_settings("local", matih_home=str(tmp_path / "home"))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    svc = RegistryService(settings, ctx.registry, ctx.store)
    for _ in range(2):
        svc.register_upload("m", "onnx", onnx_bytes(), "dev")
    svc.set_alias("m", "champion", "1", "dev")
    ctx.store.create_endpoint("ep", "m@champion", "onnx", {}, "admin")
    _, viewer = ctx.store.create_token("v", "viewer", "admin")
    client = TestClient(create_app(ctx))
    admin = {"Authorization": f"Bearer {prepared.admin_token}"}
    as_viewer = {"Authorization": f"Bearer {viewer}"}

    assert client.post("/v1/rollouts", json=SMALL, headers=as_viewer).status_code == 403
    bad = client.post("/v1/rollouts", json={**SMALL, "steps": [50, 10, 100]}, headers=admin)
    assert bad.status_code == 422, bad.text
    r = client.post("/v1/rollouts", json=SMALL, headers=admin)
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert client.post("/v1/rollouts", json=SMALL, headers=admin).status_code == 409
    assert client.get(f"/v1/rollouts/{rid}", headers=as_viewer).json()["percent"] == 10
    assert [i["id"] for i in client.get("/v1/rollouts?endpoint=ep", headers=as_viewer).json()["items"]] == [rid]
    assert client.get("/v1/rollouts?endpoint=other", headers=as_viewer).json()["items"] == []
    assert client.get("/v1/rollouts/nope", headers=as_viewer).status_code == 404
    assert client.post(f"/v1/rollouts/{rid}/pause", headers=admin).json()["status"] == "paused"
    assert client.post(f"/v1/rollouts/{rid}/pause", headers=admin).status_code == 409
    assert client.post(f"/v1/rollouts/{rid}/resume", headers=admin).json()["status"] == "running"
    assert client.post(f"/v1/rollouts/{rid}/abort", headers=admin).json()["status"] == "aborted"
    assert "traffic" not in ctx.store.get_endpoint("ep")["spec"]
