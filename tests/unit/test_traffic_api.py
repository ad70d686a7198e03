"""``/v1/endpoints/{name}/traffic`` and ``/shadow/report`` over the in-process context: real
MLflow (SQLite) with two versions trained by the training pipeline on iris, the real metadata
store, prediction-log files written in the log's layout, FastAPI's TestClient."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from app.api.app import create_app
from app.api.traffic import arms_to_reset
from app.bootstrap import prepare
from app.predlog.ids import new_request_id
from app.predlog.layout import shadow_log
from app.schemas import TrainingJobSpec
from app.settings import load_settings
from app.store.models import Event
from app.traffic.bandits import ArmStats, BanditStore
from app.traffic.spec import TrafficSpec
from app.training.pipeline import train_sklearn
from tests.support import NoJobs, in_process_context
from tests.unit.test_feedback import log_rows, write_log

EP = "tr-ep"
MODEL = "tr-m"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    app = create_app(ctx)
    spec = {"name": MODEL, "estimator": "sklearn.linear_model.LogisticRegression", "register_as": MODEL,
            "hyperparameters": {"max_iter": 300}, "dataset": {"uri": "builtin://iris", "target": "target"}}
    for job in ("j1", "j2"):  # versions 1 (champion) and 2
        train_sklearn(TrainingJobSpec.model_validate(spec), settings, job, lambda *a: None)
    ctx.store.create_endpoint(EP, f"{MODEL}@champion", "onnx", {}, "admin")

    def client(role: str) -> TestClient:
        c = TestClient(app)
        _, token = ctx.store.create_token(f"{role}-user", role, "admin")
        c.headers["Authorization"] = f"Bearer {token}"
        return c

    class A:
        pass

    a = A()
    a.settings, a.ctx = settings, ctx
    a.dev, a.viewer, a.predictor = client("developer"), client("viewer"), client("predictor")
    yield a
    ctx.store.dispose()


URL = f"/v1/endpoints/{EP}/traffic"


def plan(strategy: str = "fixed", b_target: str = f"{MODEL}/2", **extra):
    return {"variants": [{"name": "a", "target": f"{MODEL}@champion", "weight": 90},
                         {"name": "b", "target": b_target, "weight": 10}],
            "sticky": {"key": "customer_id"}, "strategy": strategy, **extra}


def test_put_checks_roles_endpoint_and_every_target(api):
    assert api.viewer.put(URL, json=plan()).status_code == 403
    assert api.dev.put("/v1/endpoints/nope/traffic", json=plan()).status_code == 404
    r = api.dev.put(URL, json=plan(b_target=f"{MODEL}/99"))
    assert r.status_code == 422 and r.json()["details"]["field"] == "variants[1].target", r.text
    assert "variants[1].target" in r.json()["error"]
    r = api.dev.put(URL, json=plan(shadows=[{"target": "no-such-model@champion"}]))
    assert r.status_code == 422 and r.json()["details"]["field"] == "shadows[0].target", r.text
    r = api.dev.put(URL, json={**plan(), "variants": [{"name": "a", "target": f"{MODEL}/1", "weight": 1,
                                                       "runtime": "tensorflow"}]})
    assert r.status_code == 422 and r.json()["details"]["field"] == "variants[0].runtime", r.text
    r = api.dev.put(URL, json={"variants": [{"name": "a", "target": "x/1", "weight": 1}] * 2})
    assert r.status_code == 422  # the spec's own check: unique names
    assert api.dev.get(URL).status_code == 404  # nothing was stored


def test_put_get_and_delete_a_fixed_plan(api):
    before = api.ctx.store.get_endpoint(EP)["spec_version"]
    r = api.dev.put(URL, json=plan(shadows=[{"target": f"{MODEL}/1", "sample": 0.25, "name": "old"}]))
    assert r.status_code == 200, r.text
    row = r.json()
    assert row["spec"]["traffic"]["variants"][1]["target"] == f"{MODEL}/2"
    assert row["spec"]["traffic"]["shadows"][0]["sample"] == 0.25
    assert row["spec_version"] == before + 1
    got = api.viewer.get(URL).json()
    assert got["traffic"]["sticky"] == {"key": "customer_id"} and got["shares"] == {"a": 0.9, "b": 0.1}
    assert "arms" not in got
    audit = [a for a in api.ctx.store.list_audit(limit=1000)[0]
             if a["action"] == "endpoint.update" and a["resource_id"] == EP]
    assert audit[0]["after"]["spec"]["traffic"]["strategy"] == "fixed" and audit[0]["actor"] == "developer-user"
    with sessionmaker(api.ctx.store.engine).begin() as s:
        types = [e.type for e in s.scalars(select(Event).where(Event.subject.contains(EP)).order_by(Event.id))]
    assert types[-1] == "endpoint.updated"

    assert api.dev.delete(URL).status_code == 204
    assert api.viewer.get(URL).status_code == 404
    assert "traffic" not in api.ctx.store.get_endpoint(EP)["spec"]
    assert api.dev.delete(URL).status_code == 204  # no plan: nothing to do


def test_bandit_plan_arms_feedback_and_resets(api):
    bandits = BanditStore(api.ctx.store)
    assert api.dev.put(URL, json=plan("thompson")).status_code == 200
    # feedback for predictions the log says variant a / b served feeds the arms
    ra, rb = new_request_id(time.time() - 60), new_request_id(time.time() - 60)
    rows = log_rows(ra) + log_rows(rb)
    rows[0]["variant"], rows[1]["variant"] = "a", "b"
    write_log(api.settings.predlog.root, rows, endpoint=EP)
    r = api.predictor.post(f"/v1/endpoints/{EP}/feedback", json=[{"request_id": ra, "reward": 1.0},
                                                                  {"request_id": rb, "reward": 0.0}])
    assert r.status_code == 200 and r.json()["accepted"] == 2, r.text
    assert bandits.arms(EP) == {"a": ArmStats(1, 1.0, 1.0), "b": ArmStats(1, 0.0, 0.0)}
    api.predictor.post(f"/v1/endpoints/{EP}/feedback", json=[{"request_id": rb, "reward": 1.0}])
    assert bandits.arms(EP)["b"] == ArmStats(1, 1.0, 1.0)  # superseded: moved by the difference

    # a reward sent before its prediction reached the log is pending; the next POST counts it
    early = new_request_id()
    out = api.predictor.post(f"/v1/endpoints/{EP}/feedback", json=[{"request_id": early, "reward": 1.0}]).json()
    assert out["results"][0]["pending"] is True and bandits.arms(EP)["a"].n == 1
    late = log_rows(early)
    late[0]["variant"] = "a"
    write_log(api.settings.predlog.root, late, endpoint=EP)
    api.predictor.post(f"/v1/endpoints/{EP}/feedback", json=[{"request_id": rb, "reward": 1.0}])  # unchanged
    assert bandits.arms(EP)["a"] == ArmStats(2, 2.0, 2.0)

    got = api.viewer.get(URL).json()
    assert got["arms"]["a"]["n"] == 2 and got["arms"]["b"]["mean"] == 1.0
    assert sum(got["bandit_shares"].values()) == pytest.approx(1.0)
    assert min(got["bandit_shares"].values()) >= 0.01 - 1e-12

    # b now serves another target: its arm starts afresh, a keeps its rewards
    assert api.dev.put(URL, json=plan("thompson", b_target=f"{MODEL}/1")).status_code == 200
    assert bandits.arms(EP) == {"a": ArmStats(2, 2.0, 2.0)}
    got = api.viewer.get(URL).json()
    assert got["arms"]["b"] is None
    assert api.dev.delete(URL).status_code == 204
    assert bandits.arms(EP) == {}


def test_arms_to_reset():
    old = plan("ucb1")
    new = TrafficSpec.model_validate({**plan("ucb1"), "variants": [
        {"name": "a", "target": f"{MODEL}@champion", "weight": 1}, {"name": "c", "target": "x/1", "weight": 1}]})
    assert arms_to_reset(old, new) == ["b", "c"]
    assert arms_to_reset(plan("fixed"), new) is None  # a bandit where there was none: all
    assert arms_to_reset(None, new) is None and arms_to_reset(old, None) is None


def test_shadow_report_compares_on_the_same_requests(api):
    assert api.dev.put(URL, json=plan(shadows=[{"target": f"{MODEL}/1", "name": "v1"}])).status_code == 200
    at = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=30)
    ids = [new_request_id(at.timestamp() + i) for i in range(4)]
    primary, shadow = [], []
    for i, rid in enumerate(ids):
        row = log_rows(rid, at=at + timedelta(seconds=i), endpoint=EP, prediction=i % 2)[0]
        row.update(variant="a", latency_ms=10.0 + i, status=200)
        primary.append(row)
        copy = dict(row, endpoint=shadow_log(EP), variant="v1", latency_ms=20.0 + i,
                    prediction=json.dumps(0), status=200 if i < 3 else 503)
        if i == 3:
            copy["prediction"] = None
        shadow.append(copy)
    write_log(api.settings.predlog.root, primary, endpoint=EP)
    write_log(api.settings.predlog.root, shadow, endpoint=shadow_log(EP))
    labels = [{"request_id": rid, "label": 0} for rid in ids]
    assert api.predictor.post(f"/v1/endpoints/{EP}/feedback", json=labels).json()["accepted"] == 4

    since = (at - timedelta(minutes=1)).isoformat()
    until = (at + timedelta(minutes=1)).isoformat()
    r = api.viewer.get(f"/v1/endpoints/{EP}/shadow/report", params={"since": since, "until": until})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["task"] == "classification"  # the target's task tag
    assert out["configured_shadows"] == ["v1"] and out["primary"]["n"] == 4
    v1 = out["shadows"]["v1"]
    assert v1["n_compared"] == 4 and v1["n_both_answered"] == 3
    assert v1["agreement"] == pytest.approx(2 / 3)  # primary 0, 1, 0 vs shadow 0, 0, 0
    assert v1["error_rate"] == {"primary": 0.0, "shadow": 0.25}
    assert v1["latency_ms"]["primary"]["mean"] == 11.5 and v1["latency_ms"]["shadow"]["mean"] == 21.5
    assert v1["quality"]["n_labelled"] == 3
    assert v1["quality"]["primary"]["accuracy"] == pytest.approx(2 / 3)
    assert v1["quality"]["shadow"]["accuracy"] == 1.0

    r = api.viewer.get(f"/v1/endpoints/{EP}/shadow/report", params={"since": since, "until": until,
                                                                    "task": "regression"})
    assert r.json()["shadows"]["v1"]["quality"]["metric"] == "rmse"
    assert api.viewer.get("/v1/endpoints/nope/shadow/report").status_code == 404
    assert api.viewer.get(f"/v1/endpoints/{EP}/shadow/report", params={"since": "yesterday"}).status_code == 422
    empty = api.viewer.get(f"/v1/endpoints/{EP}/shadow/report",
                           params={"since": "2020-01-01T00:00:00Z", "until": "2020-01-02T00:00:00Z"}).json()
    assert empty["shadows"] == {} and empty["primary"]["n"] == 0
    assert api.dev.delete(URL).status_code == 204


def test_a_rollout_in_progress_owns_the_plan(api):
    """PUT and DELETE of the plan are refused (409 naming the rollout) while a rollout sets it."""
    from datetime import datetime, timezone

    from app.rollouts.store import RolloutStore

    api.ctx.store.create_endpoint("canaried", f"{MODEL}/1", "onnx", {}, "admin")
    rollouts = RolloutStore(api.ctx.store)
    step = {"variants": [{"name": "baseline", "target": f"{MODEL}/1", "weight": 95},
                         {"name": "candidate", "target": f"{MODEL}/2", "weight": 5}]}
    ro = rollouts.create(endpoint="canaried", model=MODEL, baseline="1", candidate="2", spec={"steps": [5, 100]},
                         traffic=step, actor="admin", now=datetime.now(timezone.utc))
    url = "/v1/endpoints/canaried/traffic"
    r = api.dev.put(url, json=plan())
    assert r.status_code == 409 and r.json()["details"]["rollout"] == ro["id"], r.text
    assert api.dev.delete(url).status_code == 409
    assert api.viewer.get(url).json()["traffic"]["variants"][1]["name"] == "candidate"  # untouched
