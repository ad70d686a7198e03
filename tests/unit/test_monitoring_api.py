"""The monitors routes in process (no Ray): PUT/GET/DELETE with their checks (nothing stored on a
422), webhook secrets that never come back yet survive a PUT of what GET returned, POST .../run
queueing a monitor_run job, the drift history and the report of a stored run; and the monitor
store's schedule compare-and-set and run history."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient

EP = "churn"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from app.api.app import create_app
    from app.bootstrap import prepare
    from app.settings import load_settings
    from tests.support import NoJobs, in_process_context

    home = tmp_path_factory.mktemp("home")
    settings = load_settings("local", matih_home=str(home), monitoring={"webhook_allowed_hosts": ["127.0.0.1:9"]})
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    ctx.store.create_endpoint(EP, "m@champion", "onnx", {}, "admin")
    ctx.store.create_endpoint("other", "m@champion", "onnx", {}, "admin")
    app = create_app(ctx)
    clients = {}
    for role in ("viewer", "developer"):
        _, token = ctx.store.create_token(f"t-{role}", role, "admin")
        clients[role] = TestClient(app, headers={"Authorization": f"Bearer {token}"})
    yield settings, ctx, clients
    ctx.store.dispose()


MONITOR = {
    "window": {"rows": 500}, "schedule": {"every_s": 60}, "segments": ["variant"], "correction": "bh",
    "tests": {"age": "psi"}, "thresholds": {"*": 0.2},
    "alerts": {"rules": [{"when": "drift.dataset", "severity": "critical"}, {"when": "performance.accuracy < 0.8"}],
               "channels": [{"type": "events"}, {"type": "webhook", "url": "http://127.0.0.1:9/hook",
                                                 "secret": "top-secret"}]},
    "retraining": {"policies": [{"kind": "drift"}], "rollout": {"steps": [50, 100], "bake_s": 5}},
}


def test_put_get_and_secrets(api):
    _settings, ctx, c = api
    assert c["viewer"].put(f"/v1/monitors/{EP}", json=MONITOR).status_code == 403
    r = c["developer"].put(f"/v1/monitors/{EP}", json=MONITOR)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["spec_version"] == 1 and body["next_run_at"] is not None
    assert "top-secret" not in r.text and body["spec"]["alerts"]["channels"][1]["secret_set"] is True
    got = c["viewer"].get(f"/v1/monitors/{EP}")
    assert got.status_code == 200 and "top-secret" not in got.text and got.json()["latest_run"] is None
    # PUT back what GET returned (no secret in it): the stored secret stays, version moves
    spec = got.json()["spec"]
    for ch in spec["alerts"]["channels"]:
        ch.pop("secret_set", None)
        ch.pop("headers", None) if ch.get("headers") == {} else None
    again = c["developer"].put(f"/v1/monitors/{EP}", json=spec)
    assert again.status_code == 200, again.text
    assert again.json()["spec_version"] == 2
    from app.monitoring.store import MonitorStore

    stored = MonitorStore(ctx.store).get(EP)["spec"]
    assert [ch.get("secret") for ch in stored["alerts"]["channels"] if ch["type"] == "webhook"] == ["top-secret"]
    listed = c["viewer"].get("/v1/monitors").json()["items"]
    assert [m["endpoint"] for m in listed] == [EP] and "top-secret" not in str(listed)


@pytest.mark.parametrize("body, field", [
    ({"tests": {"age": "nope"}}, "tests"),
    ({"window": {"rows": 10, "hours": 1}}, "window"),
    ({"drift_share": 0}, "drift_share"),
    ({"surprise": 1}, "surprise"),
    ({"default_test": "t-test"}, "default_test"),
    ({"alerts": {"rules": [{"when": "drift.share >>> 1"}]}}, "alerts.rules"),
    ({"alerts": {"channels": [{"type": "webhook", "url": "http://evil.example.com/x"}]}}, "alerts.channels"),
    ({"retraining": {"policies": [{"kind": "performance"}]}}, "retraining"),
    ({"retraining": {"policies": [{"kind": "sometimes"}]}}, "retraining"),
])
def test_bad_monitor_is_422_and_changes_nothing(api, body, field):
    _settings, ctx, c = api
    from app.monitoring.store import MonitorStore

    before = MonitorStore(ctx.store).find(EP)
    r = c["developer"].put(f"/v1/monitors/{EP}", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["details"]["field"].startswith(field), r.json()
    assert MonitorStore(ctx.store).find(EP) == before


def test_unknown_endpoint_and_missing_monitor(api):
    _settings, _ctx, c = api
    assert c["developer"].put("/v1/monitors/nope", json={}).status_code == 404
    for path in ("/v1/monitors/other", "/v1/monitors/other/drift", "/v1/monitors/other/report.html",
                 "/v1/monitors/other/performance"):
        assert c["viewer"].get(path).status_code == 404, path
    assert c["developer"].post("/v1/monitors/other/run").status_code == 404


def test_run_now_queues_a_job_and_history_reads_runs(api):
    _settings, ctx, c = api
    from app.monitoring.store import MonitorStore

    assert c["developer"].put(f"/v1/monitors/{EP}", json=MONITOR).status_code in (200, 201)
    r = c["developer"].post(f"/v1/monitors/{EP}/run")
    assert r.status_code == 202, r.text
    run = r.json()
    job = ctx.store.get_job(run["job_id"])
    assert job["kind"] == "monitor_run" and job["spec"] == {"endpoint": EP, "run_id": run["run_id"]}
    assert c["viewer"].get(f"/v1/monitors/{EP}/report.html").status_code == 404  # nothing finished yet
    runs = MonitorStore(ctx.store)
    now = datetime.now(timezone.utc)
    runs.start_run(run["run_id"], now=now, model="m", model_version="1", since=now - timedelta(hours=1), until=now)
    drift = {"dataset_drift": {"detected": True, "share": 0.5, "drifted": 1, "columns": 2, "threshold": 0.5},
             "correction": "none",
             "columns": {"age": {"kind": "numeric", "test": "wasserstein", "statistic": 0.4, "p_value": None,
                                 "p_adjusted": None, "threshold": 0.1, "drifted": True, "reference_rows": 2000,
                                 "current_rows": 500, "current_missing": 0,
                                 "plot": {"type": "histogram", "edges": [0, 1, 2], "reference": [0.5, 0.5],
                                          "current": [0.1, 0.9]}},
                         "city": {"kind": "categorical", "test": "jensenshannon", "statistic": 0.02, "p_value": None,
                                  "p_adjusted": None, "threshold": 0.1, "drifted": False, "reference_rows": 2000,
                                  "current_rows": 500, "current_missing": 3,
                                  "plot": {"type": "categories", "labels": ["a", "b"], "reference": [0.5, 0.5],
                                           "current": [0.45, 0.55]}}},
             "prediction_drift": None, "segments": {}, "alerts": [], "triggers": [], "outputs": {"rows": 500}}
    runs.finish_run(run["run_id"], now=now, status="succeeded", rows=500, drift=drift, performance=None)
    out = c["viewer"].get(f"/v1/monitors/{EP}/drift").json()
    assert out["latest"]["id"] == run["run_id"] and out["latest"]["dataset_drift"]["detected"] is True
    assert out["latest"]["drift"]["columns"]["age"]["drifted"] is True
    assert [h["id"] for h in out["history"]] == [run["run_id"]]
    page = c["viewer"].get(f"/v1/monitors/{EP}/report.html")
    assert page.status_code == 200 and 'id="dataset-drift"' in page.text and page.text.count('class="dist"') == 2
    one = c["viewer"].get(f"/v1/monitors/{EP}/runs/{run['run_id']}").json()
    assert one["status"] == "succeeded" and one["window"]["rows"] == 500
    assert c["viewer"].get(f"/v1/monitors/other/runs/{run['run_id']}").status_code == 404


def test_profile_route_checks_its_body(api):
    _settings, _ctx, c = api
    r = c["developer"].post("/v1/models/m/versions/1/profile", json={"dataset": "/etc/passwd"})
    assert r.status_code == 422 and r.json()["details"]["field"] == "dataset", r.text
    assert c["developer"].post("/v1/models/m/versions/1/profile", json={}).status_code == 422
    assert c["developer"].post("/v1/models/m/versions/x/profile", json={"dataset": "a.parquet"}).status_code == 422


def test_delete_monitor_audits_and_emits(api):
    _settings, ctx, c = api
    from sqlalchemy import select

    from app.store.models import AuditRecord, Event

    assert c["developer"].put(f"/v1/monitors/{EP}", json=MONITOR).status_code in (200, 201)
    assert c["developer"].delete(f"/v1/monitors/{EP}").status_code == 204
    assert c["viewer"].get(f"/v1/monitors/{EP}").status_code == 404
    with ctx.store.transaction() as s:
        actions = [a.action for a in s.scalars(select(AuditRecord).where(AuditRecord.resource_type == "monitor"))]
        types = [e.type for e in s.scalars(select(Event).where(Event.subject == f"monitors/{EP}"))]
    assert "monitor.put" in actions and "monitor.delete" in actions
    assert "monitor.updated" in types and types[-1] == "monitor.deleted"


def test_schedule_claim_is_compare_and_set(store):
    from app.monitoring.store import MonitorStore

    store.create_endpoint("ep", "m@champion", "onnx", {}, "admin")
    runs = MonitorStore(store)
    now = datetime.now(timezone.utc)
    monitor, created = runs.put("ep", {"schedule": {"every_s": 10}}, "alice", now - timedelta(seconds=30), 10)
    assert created
    due = runs.due(now)
    assert [m["endpoint"] for m in due] == ["ep"]
    expect = due[0]["next_run_at"]
    assert runs.claim_schedule("ep", expect, now + timedelta(seconds=10)) is True
    assert runs.claim_schedule("ep", expect, now + timedelta(seconds=10)) is False  # the second claimer lost
    assert runs.due(now) == []
    for i in range(5):
        run = runs.create_run("ep", trigger="schedule", actor="m", now=now + timedelta(milliseconds=i), spec_version=1)
        runs.finish_run(run["id"], now=now, status="succeeded", rows=i, drift=None, performance=None, keep=3)
    items, _ = runs.list_runs("ep", limit=10)
    assert [r["window"]["rows"] for r in items] == [4, 3, 2]
