"""The closed loop on the session's cluster, over HTTP: the `matih-ml demo loop` function at a
test's cadence (deploy, traffic with labels, no drift, shift, drift -> alert -> retraining
trigger -> training job -> gates -> challenger -> canary rollout -> promotion), then what it left
behind: the drift result and history, the HTML report, performance with its CBPE estimate,
alerts (a signed webhook received by a local server, ack), the loop's chain, the events."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from app.cli import Client
from app.monitoring.demo import DEMO_ENDPOINT, DEMO_MODEL, LoopCadence, run_loop_demo

pytestmark = pytest.mark.integration

SECRET = "s3cret-hmac-key"


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self):  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        type(self).received.append({"headers": dict(self.headers), "body": body})
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def webhook():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook", _Receiver.received
    server.shutdown()


@pytest.fixture(scope="module")
def loop(platform, webhook):
    url, _ = webhook
    client = Client(platform.url, platform.admin_token, timeout=60)
    lines: list[str] = []
    cadence = LoopCadence(train_rows=1500, baseline_requests=100, shifted_requests=110, rows_per_request=5,
                          window_rows=500, schedule_s=3600, bake_s=3, min_samples=15, traffic_rps=30, timeout_s=300)
    out = run_loop_demo(client, platform.home / "data" / "demo_loop", say=lines.append, cadence=cadence,
                        alert_channels=[{"type": "events"}, {"type": "prometheus"},
                                        {"type": "webhook", "url": url, "secret": SECRET}])
    print("\n".join(lines))
    return out, lines, client


def test_loop_promotes_the_retrained_model(loop, platform):
    out, lines, client = loop
    trigger = out["trigger"]
    assert trigger["status"] == "promoted", "\n".join(lines)
    steps = [s["step"] for s in trigger["steps"]]
    for step in ("triggered", "training", "challenger", "rollout_started", "promoted"):
        assert step in steps, steps
    model = client.call("GET", f"/v1/models/{DEMO_MODEL}")
    assert str(model["aliases"]["champion"]) == str(trigger["candidate_version"])
    rollout = client.call("GET", f"/v1/rollouts/{trigger['rollout_id']}")
    assert rollout["status"] == "promoted"
    job = client.call("GET", f"/v1/jobs/{trigger['job_id']}")
    assert job["status"] == "succeeded" and job["result"]["validation"]["passed"]


def test_drift_history_report_and_performance(loop, platform, tmp_path):
    _out, _lines, client = loop
    drift = client.call("GET", f"/v1/monitors/{DEMO_ENDPOINT}/drift")
    latest = drift["latest"]
    assert latest["dataset_drift"]["detected"] is True
    cols = latest["drift"]["columns"]
    assert cols["x0"]["drifted"] and cols["x1"]["drifted"] and not cols["x2"]["drifted"]
    assert cols["x0"]["test"] == "wasserstein"  # 1500 reference rows: a distance, as Evidently chooses
    assert [h["dataset_drift"]["detected"] for h in drift["history"] if h["dataset_drift"]][-1] is False
    perf = client.call("GET", f"/v1/monitors/{DEMO_ENDPOINT}/performance")["latest"]["performance"]
    acc = perf["overall"]["accuracy"]
    assert acc["value"] < 0.85 and acc["ci"][0] <= acc["value"] <= acc["ci"][1]
    assert perf["estimated"]["accuracy"]["value"] is not None
    page = client.http.get(f"/v1/monitors/{DEMO_ENDPOINT}/report.html")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "dataset-drift" in page.text and page.text.count('class="dist"') >= 2


def test_alerts_webhook_signed_and_ack(loop, webhook, platform):
    from app.monitoring.alerts import verify_signature
    from tests.support import wait_until

    _out, _lines, client = loop
    _url, received = webhook
    wait_until(lambda: received, timeout=30)
    hit = received[0]
    headers = {k.lower(): v for k, v in hit["headers"].items()}
    assert verify_signature(SECRET, headers["x-matih-timestamp"], hit["body"], headers["x-matih-signature"])
    assert not verify_signature("wrong", headers["x-matih-timestamp"], hit["body"], headers["x-matih-signature"])
    payload = json.loads(hit["body"])
    assert payload["endpoint"] == DEMO_ENDPOINT
    alerts = client.call("GET", f"/v1/alerts?endpoint={DEMO_ENDPOINT}")["items"]
    rules = {a["rule"] for a in alerts}
    assert any("drift" in r for r in rules), rules
    firing = [a for a in alerts if a["status"] == "firing"]
    if firing:
        acked = client.call("POST", f"/v1/alerts/{firing[0]['id']}/ack", {"note": "looking"})
        assert acked["status"] == "acknowledged"
    events = client.call("GET", "/v1/events?limit=1000")["items"]
    types = {e["type"] for e in events}
    assert {"alert.fired", "retrain.triggered", "retrain.promoted", "monitor.run.succeeded"} <= types, types


def test_monitor_spec_errors_are_422(platform):
    with platform.client() as c:
        bad = c.put(f"/v1/monitors/{DEMO_ENDPOINT}", json={"tests": {"x0": "nope"}})
        assert bad.status_code == 422 and "nope" in bad.json()["error"]
        bad = c.put(f"/v1/monitors/{DEMO_ENDPOINT}", json={"window": {"rows": 10, "hours": 1}})
        assert bad.status_code == 422
        bad = c.put(f"/v1/monitors/{DEMO_ENDPOINT}", json={"alerts": {"channels": [
            {"type": "webhook", "url": "http://evil.example.com/x"}]}})
        assert bad.status_code == 422 and bad.json()["details"]["field"].startswith("alerts.channels"), bad.text
        assert c.put("/v1/monitors/no-such-endpoint", json={}).status_code == 404
        assert c.get("/v1/monitors/no-such-endpoint/drift").status_code == 404


def test_a_restarted_drift_monitor_keeps_the_schedule(loop, platform):
    """Kill the DriftMonitor: its new incarnation (nothing held in the old one) queues the next
    scheduled run from the monitors table."""
    import ray

    from actors.drift_monitor import ACTOR_NAME
    from tests.support import kill_and_time, wait_until

    _out, _lines, client = loop
    kill_and_time(ACTOR_NAME, lambda h: ray.get(h.ping.remote(), timeout=5))
    spec = client.call("GET", f"/v1/monitors/{DEMO_ENDPOINT}")["spec"]
    spec = {**spec, "schedule": {"every_s": 5}, "retraining": None, "segments": ["variant"]}
    spec["alerts"] = {"rules": spec["alerts"]["rules"], "channels": [{"type": "events"}]}
    client.call("PUT", f"/v1/monitors/{DEMO_ENDPOINT}", spec)

    def scheduled():
        history = client.call("GET", f"/v1/monitors/{DEMO_ENDPOINT}/drift?limit=50")["history"]
        return [r for r in history if r["trigger"] == "schedule"]

    try:
        runs = wait_until(scheduled, timeout=60)
        assert runs[-1]["created_by"] == "drift-monitor"
        client.call("PUT", f"/v1/monitors/{DEMO_ENDPOINT}", {**spec, "schedule": None})  # no more runs
        job = platform.wait_job(runs[-1]["job_id"], timeout=180)
        assert job["status"] == "succeeded", job
        run = client.call("GET", f"/v1/monitors/{DEMO_ENDPOINT}/runs/{runs[-1]['id']}")
        by_variant = run["segments"]["variant"]  # the rollout's arms and the plain traffic after it
        assert by_variant and all("dataset_drift" in r for r in by_variant.values()), run["segments"]
        assert set(run["performance"]["variants"]) >= set(by_variant)
    finally:
        client.call("DELETE", f"/v1/monitors/{DEMO_ENDPOINT}")
