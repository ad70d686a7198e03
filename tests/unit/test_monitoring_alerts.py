"""Alerts (app.monitoring.alerts): the rule grammar, evaluation on a run's outputs, the table's
de-duplication, resolution, cooldown and reminders in the real metadata store (SQLite and
PostgreSQL) with their audit records and events, acknowledgement, pagination, the webhook
allow-list, a real signed webhook against a local HTTP server that fails twice before it
answers, the Prometheus gauge, and the /v1/alerts routes."""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pydantic import ValidationError
from sqlalchemy import select

from tests.support import Clock
from app.errors import Conflict, InvalidInput, NotFound
from app.monitoring.alerts import (
    CHANNELS, AlertChannel, AlertRule, AlertService, AlertsSpec, Condition, check_channels, evaluate, fingerprint,
    merge_secrets, parse_when, sign, verify_signature,
)

T0 = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc)
OUTPUTS = {"rows": 5000, "drift.dataset": True, "drift.share": 0.6, "drift.feature[age]": True,
           "drift.feature[city]": False, "drift.prediction": False, "drift.segment[country=FR]": True,
           "performance.accuracy": 0.81, "performance.f1": 0.79, "estimated.accuracy": 0.84, "predlog.drops": 12}


def _settings(tmp_path, **monitoring):
    from app.settings import load_settings

    return load_settings("local", matih_home=str(tmp_path / "home"), need_admin_token=False,
                         monitoring={"webhook_backoff_s": 0.01, **monitoring})


def _events(store, prefix: str = "alert."):
    from app.store.models import Event

    with store.transaction() as s:
        return [(r.type, r.subject, r.data) for r in s.scalars(select(Event).order_by(Event.id))
                if r.type.startswith(prefix)]


def _audit(store):
    items, _ = store.list_audit(resource_type="alert", limit=500)
    return [(i["action"], i["actor"]) for i in reversed(items)]


# -- rules -------------------------------------------------------------------------------------
@pytest.mark.parametrize("when, cond", [
    ("drift.dataset", Condition("drift.dataset")),
    ("drift.share > 0.3", Condition("drift.share", ">", 0.3)),
    ("drift.share>=.5", Condition("drift.share", ">=", 0.5)),
    ("performance.f1 < 0.7", Condition("performance.f1", "<", 0.7)),
    ("estimated.accuracy <= 8e-1", Condition("estimated.accuracy", "<=", 0.8)),
    ("predlog.drops != 0", Condition("predlog.drops", "!=", 0.0)),
    ("rows == 1000", Condition("rows", "==", 1000.0)),
    ("drift.feature[age]", Condition("drift.feature[age]")),
    ("drift.feature[first name]", Condition("drift.feature[first name]")),
    ("drift.feature[*] >= 3", Condition("drift.feature[*]", ">=", 3.0)),
    ("drift.segment[country=FR]", Condition("drift.segment[country=FR]")),
    ("  drift.prediction  ", Condition("drift.prediction")),
])
def test_good_conditions_parse(when, cond):
    assert parse_when(when) == cond
    assert AlertRule(when=when).condition == cond


@pytest.mark.parametrize("when", [
    "", "drift", "drift.shares > 1", "drift.share >", "drift.share > x", "drift.share => 1", "drift.share > 1 2",
    "drift.feature[]", "drift.feature[a", "drift.segment[country]", "performance. < 1", "latency > 5",
    "drift.share > inf", "rows > 1e999", "drift.share < 0.5 or rows > 1",
])
def test_bad_conditions_are_validation_errors_naming_the_rule_and_the_grammar(when):
    with pytest.raises(ValidationError) as err:
        AlertRule(name="my-rule", when=when)
    text = str(err.value)
    assert "'my-rule'" in text and "drift.feature[<name>]" in text and "<op>" in text


def test_rule_names_default_from_the_condition_and_are_checked():
    assert AlertRule(when="drift.share > 0.5").name == "drift.share-gt-0.5"
    assert AlertRule(when="drift.feature[*]").name == "drift.feature-any"
    assert AlertRule(when="drift.segment[country=FR]").name == "drift.segment-country-fr"
    assert AlertRule(when="performance.f1 <= 0.7", name="").name == "performance.f1-le-0.7"
    long = AlertRule(when=f"drift.feature[{'x' * 100}]").name
    assert len(long) <= 64
    rule = AlertRule(when="drift.dataset")
    assert (rule.severity, rule.cooldown_s) == ("warning", 3600.0)
    for bad in ({"name": "Bad Name", "when": "rows"}, {"when": "rows", "cooldown_s": -1},
                {"when": "rows", "severity": "page"}, {"when": "rows", "extra": 1}):
        with pytest.raises(ValidationError):
            AlertRule.model_validate(bad)
    with pytest.raises(ValidationError, match="two alert rules are named 'rows'"):
        AlertsSpec(rules=[AlertRule(when="rows"), AlertRule(when="rows")])


def test_evaluation():
    rules = [AlertRule(when=w) for w in (
        "drift.dataset", "drift.share > 0.5", "drift.share > 0.7", "drift.prediction", "drift.feature[age]",
        "drift.feature[city]", "drift.feature[*]", "drift.feature[*] >= 2", "drift.segment[country=FR]",
        "performance.f1 < 0.8", "estimated.accuracy < 0.8", "predlog.drops > 0", "rows < 1000",
        "performance.auc < 0.7", "drift.segment[country=DE]",
    )]
    got = {e.rule.when: e for e in evaluate(rules, OUTPUTS)}
    fired = {w for w, e in got.items() if e.fired}
    assert fired == {"drift.dataset", "drift.share > 0.5", "drift.feature[age]", "drift.feature[*]",
                     "drift.segment[country=FR]", "performance.f1 < 0.8", "predlog.drops > 0"}
    assert got["drift.share > 0.5"].value == 0.6 and got["drift.share > 0.5"].threshold == 0.5
    assert got["drift.feature[*]"].value == 1 and got["drift.feature[*]"].detail == {"drifted": ["age"]}
    assert not got["drift.feature[*] >= 2"].fired and got["drift.feature[*] >= 2"].present
    # absent metrics neither fire nor resolve
    assert not got["performance.auc < 0.7"].present and not got["drift.segment[country=DE]"].present
    assert all(e.present for w, e in got.items() if w not in ("performance.auc < 0.7", "drift.segment[country=DE]"))
    none = evaluate([AlertRule(when="drift.feature[*]"), AlertRule(when="performance.f1 < 1")],
                    {"performance.f1": float("nan")})
    assert [e.present for e in none] == [False, False]


# -- channels ----------------------------------------------------------------------------------
def test_channels_default_and_are_checked(tmp_path):
    spec = AlertsSpec()
    assert [c.type for c in spec.channels] == ["events", "prometheus"]
    assert set(CHANNELS) == {"webhook", "events", "prometheus"}
    for bad in ({"type": "webhook"}, {"type": "webhook", "url": "ftp://h/x"}, {"type": "webhook", "url": "http://"},
                {"type": "events", "url": "http://h/"}, {"type": "email"},
                {"type": "webhook", "url": "http://h/", "headers": {"X-Matih-Signature": "x"}},
                {"type": "webhook", "url": "http://h/", "headers": {"A": "b\r\nc"}}):
        with pytest.raises(ValidationError):
            AlertChannel.model_validate(bad)
    hook = AlertChannel(type="webhook", url="https://user:pw@hooks.example.com/x", secret="s3cret",
                        headers={"Authorization": "Bearer t"})
    shown = json.dumps(AlertsSpec(channels=[hook]).public())
    assert "s3cret" not in shown and "Bearer t" not in shown and ":pw@" not in shown and '"secret_set": true' in shown
    assert AlertsSpec(channels=[hook]).stored()["channels"][0]["secret"] == "s3cret"
    assert AlertsSpec.model_validate(AlertsSpec(channels=[hook]).stored()).channels[0].secret.get_secret_value() \
        == "s3cret"
    # a client PUTting back what it read keeps the secret
    again = merge_secrets(AlertsSpec(channels=[AlertChannel(type="webhook", url=hook.url)]),
                          AlertsSpec(channels=[hook]))
    assert again.channels[0].secret.get_secret_value() == "s3cret"

    settings = _settings(tmp_path, webhook_allowed_hosts=["hooks.example.com", "10.0.0.5:8080"])
    check_channels([AlertChannel(type="events"), hook], settings)
    check_channels([AlertChannel(type="webhook", url="http://10.0.0.5:8080/a")], settings)
    for i, url in ((1, "http://evil.example.com/x"), (0, "http://10.0.0.5/a"), (0, "https://hooks.example.com.evil/")):
        channels = [AlertChannel(type="events")] * i + [AlertChannel(type="webhook", url=url)]
        with pytest.raises(InvalidInput) as err:
            check_channels(channels, settings)
        assert err.value.details == {"field": f"alerts.channels[{i}].url"}
        assert "webhook_allowed_hosts" in err.value.message


def test_signatures():
    body = b'{"a":1}'
    header = sign("k", 1700000000, body)
    assert header.startswith("sha256=") and len(header) == 7 + 64
    assert verify_signature("k", "1700000000", body, header, now=1700000100)
    assert verify_signature("k", "1700000000", body.decode(), header, now=1700000100)
    assert not verify_signature("other", "1700000000", body, header, now=1700000100)
    assert not verify_signature("k", "1700000000", b'{"a":2}', header, now=1700000100)
    assert not verify_signature("k", "1700000000", body, header, now=1700000000 + 301)  # replayed
    assert not verify_signature("k", "1700000001", body, header, now=1700000001)
    assert not verify_signature("k", "x", body, header) and not verify_signature("k", "1700000000", body, None)


# -- the table ---------------------------------------------------------------------------------
DRIFT = AlertRule(name="drift", when="drift.share > 0.5", severity="critical", cooldown_s=600)


def test_three_firing_runs_make_one_alert(store, tmp_path):
    clock = Clock(T0)
    svc = AlertService(store, _settings(tmp_path), clock)
    spec = AlertsSpec(rules=[DRIFT, AlertRule(when="performance.auc < 0.5")])
    out = svc.process("ep", "run1", spec, OUTPUTS)
    assert [(o["rule"], o["outcome"]) for o in out] == [("drift", "opened"), ("performance.auc-lt-0.5", "absent")]
    for run in ("run2", "run3"):
        clock.advance(60)
        (o, _) = svc.process("ep", run, spec, {**OUTPUTS, "drift.share": 0.7})
        assert o["outcome"] == "repeated" and o["alert_id"] == out[0]["alert_id"]
    (alert,), nxt = svc.list()
    assert nxt is None
    assert alert["fire_count"] == 3 and alert["status"] == "firing" and alert["run_id"] == "run3"
    assert alert["value"]["value"] == 0.7 and alert["value"]["threshold"] == 0.5 and alert["severity"] == "critical"
    assert alert["fingerprint"] == fingerprint("ep", "drift") and alert["metric"] == "drift.share"
    assert alert["first_fired_at"] == T0.isoformat() and alert["last_fired_at"] == (T0 + timedelta(seconds=120)).isoformat()
    events = _events(store)
    assert [(t, s) for t, s, _ in events] == [("alert.fired", f"alerts/{alert['id']}")]
    assert events[0][2]["endpoint"] == "ep" and events[0][2]["value"] == 0.6 and events[0][2]["severity"] == "critical"
    assert alert["deliveries"] == []  # no webhook channel: nothing to deliver
    # another endpoint's rule of the same name is another alert
    assert svc.process("other", "r", spec, OUTPUTS)[0]["outcome"] == "opened"
    assert len(svc.list()[0]) == 2


def test_resolve_cooldown_and_reminders(store, tmp_path):
    clock = Clock(T0)
    svc = AlertService(store, _settings(tmp_path, webhook_allowed_hosts=["127.0.0.1"]), clock)
    spec = AlertsSpec(rules=[DRIFT], channels=[AlertChannel(type="events"),
                                               AlertChannel(type="webhook", url="http://127.0.0.1:9/hook")])
    first = svc.process("ep", "r1", spec, OUTPUTS)[0]["alert_id"]
    assert [d["status"] for d in svc.get(first)["deliveries"]] == ["pending"]
    clock.advance(700)  # past the cooldown while still firing: a reminder
    assert svc.process("ep", "r2", spec, OUTPUTS)[0]["outcome"] == "reminded"
    clock.advance(10)
    assert svc.process("ep", "r3", spec, OUTPUTS)[0]["outcome"] == "repeated"
    alert = svc.get(first)
    assert [(d["event"], d["reminder"]) for d in alert["deliveries"]] == [("alert.fired", False), ("alert.fired", True)]
    assert alert["notified_at"] == (T0 + timedelta(seconds=700)).isoformat()
    # a run without the metric changes nothing
    clock.advance(10)
    assert svc.process("ep", "r4", spec, {"rows": 10})[0]["outcome"] == "absent"
    assert svc.get(first)["status"] == "firing"
    # the rule clears: resolved, once
    clock.advance(10)
    out = svc.process("ep", "r5", spec, {**OUTPUTS, "drift.share": 0.1})[0]
    assert (out["outcome"], out["alert_id"]) == ("resolved", first)
    alert = svc.get(first)
    assert alert["status"] == "resolved" and alert["resolved_at"] == clock.t.isoformat()
    assert alert["deliveries"][-1]["event"] == "alert.resolved"
    assert svc.process("ep", "r6", spec, {**OUTPUTS, "drift.share": 0.1})[0]["outcome"] == "ok"
    # firing again within the cooldown: suppressed, nothing new
    clock.advance(300)
    out = svc.process("ep", "r7", spec, OUTPUTS)[0]
    assert out["outcome"] == "suppressed" and out["alert_id"] == first
    assert len(svc.list()[0]) == 1
    # after the cooldown: a new alert
    clock.advance(301)
    out = svc.process("ep", "r8", spec, OUTPUTS)[0]
    assert out["outcome"] == "opened" and out["alert_id"] != first and out["alert_id"] > first
    assert [t for t, _, _ in _events(store)] == ["alert.fired", "alert.resolved", "alert.fired"]
    assert _audit(store) == [("alert.fire", "system:monitor"), ("alert.resolve", "system:monitor"),
                             ("alert.fire", "system:monitor")]


def test_ack(store, tmp_path):
    clock = Clock(T0)
    svc = AlertService(store, _settings(tmp_path), clock)
    spec = AlertsSpec(rules=[AlertRule(name="drift", when="drift.dataset", cooldown_s=0)])
    aid = svc.process("ep", "r1", spec, OUTPUTS)[0]["alert_id"]
    clock.advance(5)
    acked = svc.ack(aid, "alice", "looking into it")
    assert acked["status"] == "acknowledged" and acked["acked_by"] == "alice"
    assert acked["acked_at"] == clock.t.isoformat() and acked["value"]["ack_note"] == "looking into it"
    assert svc.ack(aid, "bob") == acked  # twice: unchanged
    # still open: counts, never reminded (cooldown 0 would remind a firing one every run)
    clock.advance(5)
    assert svc.process("ep", "r2", spec, OUTPUTS)[0]["outcome"] == "repeated"
    assert svc.get(aid)["fire_count"] == 2 and svc.get(aid)["value"]["ack_note"] == "looking into it"
    assert svc.process("ep", "r3", spec, {"drift.dataset": False})[0]["outcome"] == "resolved"
    with pytest.raises(Conflict):
        svc.ack(aid, "alice")
    with pytest.raises(NotFound):
        svc.ack("nope", "alice")
    with pytest.raises(NotFound):
        svc.get("nope")
    events = _events(store)
    assert [t for t, _, _ in events] == ["alert.fired", "alert.acknowledged", "alert.resolved"]
    assert events[1][2]["acked_by"] == "alice" and events[1][2]["note"] == "looking into it"
    assert ("alert.ack", "alice") in _audit(store)


def test_removed_rules_and_deleted_monitors_resolve_their_alerts(store, tmp_path):
    clock = Clock(T0)
    svc = AlertService(store, _settings(tmp_path), clock)
    f1 = AlertRule(name="f1", when="performance.f1 < 0.8")
    out = svc.process("ep", "r1", AlertsSpec(rules=[DRIFT, f1]), OUTPUTS)
    drift_id, f1_id = (o["alert_id"] for o in out)
    clock.advance(1)
    louder = f1.model_copy(update={"severity": "critical"})
    out = svc.process("ep", "r2", AlertsSpec(rules=[louder]), OUTPUTS)  # drift's rule removed; f1 made critical
    assert [(o["rule"], o["outcome"]) for o in out] == [("f1", "repeated"), ("drift", "resolved")]
    assert svc.get(drift_id)["status"] == "resolved" and svc.get(f1_id)["severity"] == "critical"
    assert _events(store)[-1][2]["reason"] == "rule removed"
    assert svc.close_endpoint("ep", "alice") == 1 and svc.get(f1_id)["status"] == "resolved"
    assert svc.close_endpoint("ep", "alice") == 0
    assert _audit(store)[-1] == ("alert.resolve", "alice")
    # no rules left at all: every open alert of the endpoint resolves, other endpoints' stay
    clock.advance(4000)
    other = svc.process("other", "r", AlertsSpec(rules=[f1]), OUTPUTS)[0]["alert_id"]
    again = svc.process("ep", "r3", AlertsSpec(rules=[f1]), OUTPUTS)[0]["alert_id"]
    assert [o["outcome"] for o in svc.process("ep", "r4", AlertsSpec(), OUTPUTS)] == ["resolved"]
    assert svc.get(again)["status"] == "resolved" and svc.get(other)["status"] == "firing"


def test_list_filters_and_pages(store, tmp_path):
    clock = Clock(T0)
    svc = AlertService(store, _settings(tmp_path), clock)
    rules = [AlertRule(when=f"rows > {i}", severity="critical" if i % 2 else "info") for i in range(7)]
    ids = []
    for ep in ("a", "b"):
        clock.advance(1)
        ids += [o["alert_id"] for o in svc.process(ep, "r", AlertsSpec(rules=rules), OUTPUTS)]
    assert ids == sorted(ids) and len(set(ids)) == 14  # in the order made, within one run too
    seen, token = [], None
    while True:
        items, token = svc.list(limit=3, page_token=token)
        seen += [i["id"] for i in items]
        if token is None:
            break
    assert seen == ids[::-1]
    assert [i["id"] for i in svc.list(endpoint="a", severity="critical")[0]] == [ids[5], ids[3], ids[1]]
    assert svc.list(status="resolved")[0] == []
    assert len(svc.list(status="firing", limit=500)[0]) == 14
    with pytest.raises(InvalidInput):
        svc.list(status="open")
    with pytest.raises(InvalidInput):
        svc.list(page_token="garbage!")


# -- the webhook -------------------------------------------------------------------------------
class _Receiver:
    """A real HTTP server on 127.0.0.1 that records each request and answers from ``codes``
    (then 200)."""

    def __init__(self, codes: list[int]):
        self.codes = list(codes)
        self.requests: list[tuple[dict[str, str], bytes]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                outer.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                code = outer.codes.pop(0) if outer.codes else 200
                self.send_response(code)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    made = []

    def make(codes):
        made.append(_Receiver(codes))
        return made[-1]

    yield make
    for r in made:
        r.close()


def test_a_real_signed_webhook_is_retried_and_delivered(store, tmp_path, receiver):
    hook = receiver([503, 503])
    settings = _settings(tmp_path, webhook_allowed_hosts=[f"127.0.0.1:{hook.port}"])
    svc = AlertService(store, settings, Clock(T0))
    channel = AlertChannel(type="webhook", url=f"http://127.0.0.1:{hook.port}/alerts", secret="whsec",
                           headers={"Authorization": "Bearer abc"})
    spec = AlertsSpec(rules=[DRIFT], channels=[AlertChannel(type="events"), channel])
    aid = svc.process("ep", "run1", spec, OUTPUTS)[0]["alert_id"]
    started = time.monotonic()
    assert svc.deliver_pending(lambda endpoint: spec) == 1
    assert time.monotonic() - started < 5
    assert len(hook.requests) == 3
    headers, body = hook.requests[-1]
    assert verify_signature("whsec", headers["x-matih-timestamp"], body, headers["x-matih-signature"])
    assert not verify_signature("wrong", headers["x-matih-timestamp"], body, headers["x-matih-signature"])
    assert headers["content-type"] == "application/json" and headers["x-matih-event"] == "alert.fired"
    assert headers["authorization"] == "Bearer abc"
    assert len({h["x-matih-delivery"] for h, _ in hook.requests}) == 1  # one id across retries
    payload = json.loads(body)
    assert payload["alert"]["id"] == aid and payload["endpoint"] == "ep" and payload["status"] == "firing"
    assert payload["severity"] == "critical" and payload["rule"] == "drift" and payload["value"] == 0.6
    assert payload["threshold"] == 0.5 and payload["event"] == "alert.fired" and "whsec" not in body.decode()
    (d,) = svc.get(aid)["deliveries"]
    assert d["status"] == "delivered" and d["attempts"] == 3 and d["http_status"] == 200 and d["last_error"] is None
    assert d["id"] == headers["x-matih-delivery"] and d["channel"] == 1
    assert svc.deliver_pending(lambda endpoint: spec) == 0 and len(hook.requests) == 3  # nothing pending

    # the resolution goes out too
    svc.process("ep", "run2", spec, {**OUTPUTS, "drift.share": 0.0})
    assert svc.deliver_pending(lambda endpoint: spec) == 1
    assert hook.requests[-1][0]["x-matih-event"] == "alert.resolved"
    assert json.loads(hook.requests[-1][1])["status"] == "resolved"


def test_webhook_failures_are_recorded(store, tmp_path, receiver):
    hook = receiver([400, 500, 500, 500])
    settings = _settings(tmp_path, webhook_allowed_hosts=[f"127.0.0.1:{hook.port}"], webhook_max_attempts=3)
    clock = Clock(T0)
    svc = AlertService(store, settings, clock)
    url = f"http://127.0.0.1:{hook.port}/x"
    spec = AlertsSpec(rules=[AlertRule(name="a", when="drift.dataset"), AlertRule(name="b", when="rows > 1")],
                      channels=[AlertChannel(type="webhook", url=url)])
    a, b = (o["alert_id"] for o in svc.process("ep", "r", spec, OUTPUTS))
    assert svc.deliver_pending(lambda endpoint: spec) == 0
    (da,), (db,) = svc.get(a)["deliveries"], svc.get(b)["deliveries"]
    assert (da["status"], da["attempts"], da["http_status"]) == ("failed", 1, 400)  # a 4xx is not retried
    assert (db["status"], db["attempts"], db["http_status"]) == ("failed", 3, 500) and "500" in db["last_error"]
    assert len(hook.requests) == 4 and "x-matih-signature" not in hook.requests[0][0]  # no secret: unsigned
    # a host taken off the allow-list, a channel removed, a monitor gone: failed, nothing sent
    clock.advance(4000)
    svc.process("ep", "r2", spec, OUTPUTS)  # reminders
    narrowed = AlertService(store, _settings(tmp_path), clock)
    assert narrowed.deliver_pending(lambda endpoint: spec) == 0
    assert svc.get(a)["deliveries"][-1]["last_error"].startswith("host no longer")
    clock.advance(4000)
    svc.process("ep", "r3", spec, OUTPUTS)
    assert svc.deliver_pending(lambda endpoint: AlertsSpec(rules=spec.rules)) == 0

    def gone(endpoint):
        raise NotFound("no monitor")

    clock.advance(4000)
    svc.process("ep", "r4", spec, OUTPUTS)
    assert svc.deliver_pending(gone) == 0
    assert len(hook.requests) == 4
    assert all(d["status"] == "failed" for d in svc.get(b)["deliveries"])


def test_connection_refused_is_retried(store, tmp_path):
    settings = _settings(tmp_path, webhook_allowed_hosts=["127.0.0.1:9"], webhook_max_attempts=2)
    svc = AlertService(store, settings, Clock(T0))
    spec = AlertsSpec(rules=[DRIFT], channels=[AlertChannel(type="webhook", url="http://127.0.0.1:9/")])
    aid = svc.process("ep", "r", spec, OUTPUTS)[0]["alert_id"]
    assert svc.deliver_pending(lambda endpoint: spec) == 0
    (d,) = svc.get(aid)["deliveries"]
    assert d["status"] == "failed" and d["attempts"] == 2 and d["http_status"] is None and "Connect" in d["last_error"]


# -- the prometheus channel ----------------------------------------------------------------------
def test_export_gauges(store, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    from app import metrics

    reg = metrics._Registry()
    monkeypatch.setattr(metrics, "_registry", reg)
    try:
        svc = AlertService(store, _settings(tmp_path), Clock(T0))
        spec = AlertsSpec(rules=[DRIFT, AlertRule(name="f1", when="performance.f1 < 0.8", severity="info")])
        svc.process("ep", "r", spec, OUTPUTS)
        assert svc.export_gauges() == {("ep", "drift", "critical"): 1, ("ep", "f1", "info"): 1}
        svc.process("ep", "r", spec, {**OUTPUTS, "performance.f1": 0.9})
        assert svc.export_gauges() == {("ep", "drift", "critical"): 1}
        gauges = {k[1]: v for k, (_, v) in reg.gauges.items() if k[0] == "matih_alerts_firing"}
        assert gauges == {("ep", "drift", "critical"): 1, ("ep", "f1", "info"): 0}
        assert reg.metrics["matih_alerts_firing"].info["tag_keys"] == ("endpoint", "rule", "severity")
    finally:
        reg.closed.set()


# -- the routes ----------------------------------------------------------------------------------
def test_the_alert_routes(tmp_path):
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from app.api.alerts import router
    from app.api.errors import install_error_handlers
    from app.bootstrap import prepare
    from app.settings import load_settings
    from tests.support import NoJobs, in_process_context

    settings = load_settings("local", matih_home=str(tmp_path / "home"))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, NoJobs())
    try:
        app = FastAPI()
        install_error_handlers(app)
        app.include_router(router(ctx))
        _, viewer = ctx.store.create_token("v", "viewer", "admin")
        _, developer = ctx.store.create_token("d", "developer", "admin")
        client = TestClient(app)
        as_viewer = {"Authorization": f"Bearer {viewer}"}
        as_dev = {"Authorization": f"Bearer {developer}"}
        svc = AlertService(ctx.store, settings)
        rules = [DRIFT, AlertRule(name="f1", when="performance.f1 < 0.8", severity="info")]
        ids = [o["alert_id"] for o in svc.process("ep", "r1", AlertsSpec(rules=rules), OUTPUTS)]

        assert client.get("/v1/alerts").status_code == 401
        page = client.get("/v1/alerts?limit=1", headers=as_viewer).json()
        assert [i["id"] for i in page["items"]] == [ids[1]] and page["next_page_token"]
        page2 = client.get(f"/v1/alerts?limit=1&page_token={page['next_page_token']}", headers=as_viewer).json()
        assert [i["id"] for i in page2["items"]] == [ids[0]] and page2["next_page_token"] is None
        assert [i["id"] for i in client.get("/v1/alerts?severity=critical&endpoint=ep&status=firing",
                                            headers=as_viewer).json()["items"]] == [ids[0]]
        assert client.get("/v1/alerts?status=open", headers=as_viewer).status_code == 422
        assert client.get("/v1/alerts?page_token=zz", headers=as_viewer).status_code == 422
        assert client.get(f"/v1/alerts/{ids[0]}", headers=as_viewer).json()["rule"] == "drift"
        assert client.get("/v1/alerts/nope", headers=as_viewer).status_code == 404

        assert client.post(f"/v1/alerts/{ids[0]}/ack", headers=as_viewer).status_code == 403
        r = client.post(f"/v1/alerts/{ids[0]}/ack", json={"note": "on it"}, headers=as_dev)
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "acknowledged" and r.json()["acked_by"] == "d"
        assert client.post(f"/v1/alerts/{ids[0]}/ack", headers=as_dev).json() == r.json()
        assert client.post(f"/v1/alerts/{ids[1]}/ack", json={"bogus": 1}, headers=as_dev).status_code == 422
        svc.process("ep", "r2", AlertsSpec(rules=rules), {**OUTPUTS, "performance.f1": 0.9})
        assert client.post(f"/v1/alerts/{ids[1]}/ack", headers=as_dev).status_code == 409
        assert client.post("/v1/alerts/nope/ack", headers=as_dev).status_code == 404
    finally:
        ctx.store.dispose()
