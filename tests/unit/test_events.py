"""Platform events: written to the outbox in the transaction of each change, read back through
the outbox and GET /v1/events, and relayed in order, at least once, through a sink that fails
and recovers. SQLite and the real PostgreSQL (the ``store`` fixture)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.errors import ConfigError, Conflict, DependencyUnavailable, InvalidInput
from app.events import model as m
from app.events.outbox import Outbox
from app.events.relay import EventRelay
from app.events.sinks import SINKS, EventSink, NoSink, make_sink
from app.settings import load_settings
from app.store.models import Event


class RecordingSink(EventSink):
    """A sink that keeps what it was sent, and refuses while ``down``."""

    name = "recording"

    def __init__(self):
        self.down = False
        self.batches: list[list[m.CloudEvent]] = []
        self.refused = 0

    def publish(self, events):
        if self.down:
            self.refused += 1
            raise DependencyUnavailable("recording sink is down")
        self.batches.append(list(events))

    @property
    def events(self) -> list[m.CloudEvent]:
        return [e for b in self.batches for e in b]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _settings(**events):
    return load_settings("local", matih_home="/tmp/unused-matih-home", events={"relay_batch": 3, **events})


def _types(store, **kw):
    items, _ = Outbox(store).read(limit=1000, **kw)
    return [(e["type"], e["subject"]) for e in items]


# -- writing: one transaction with the change -------------------------------------------------
def test_job_lifecycle_writes_its_events_in_order(store):
    job = store.create_job("training", "iris", {"x": 1}, "alice")
    jid = job["job_id"]
    store.transition_job(jid, "running", expect="queued")
    store.transition_job(jid, "queued")  # retried after a crash
    store.transition_job(jid, "running")
    store.transition_job(jid, "failed", error="boom at postgresql://u:secret@db/x")
    store.transition_job(jid, "queued", error=None)  # an explicit retry
    store.transition_job(jid, "running")
    store.transition_job(jid, "succeeded", result={"model_version": "3"})
    batch = store.create_job("batch_prediction", "score", {}, "bob")
    store.transition_job(batch["job_id"], "cancelled")
    subject = f"jobs/{jid}"
    assert _types(store) == [
        ("training.job.queued", subject), ("training.job.started", subject), ("training.job.queued", subject),
        ("training.job.started", subject), ("training.job.failed", subject), ("training.job.queued", subject),
        ("training.job.started", subject), ("training.job.succeeded", subject),
        ("batch.job.queued", f"jobs/{batch['job_id']}"), ("batch.job.cancelled", f"jobs/{batch['job_id']}"),
    ]
    items, _ = Outbox(store).read(type_="training.job")
    failed = next(e for e in items if e["type"] == "training.job.failed")
    assert failed["data"]["error"] == "boom at postgresql://u:***@db/x"  # redacted as the job row is
    assert failed["data"]["previous_status"] == "running" and failed["data"]["kind"] == "training"
    done = items[-1]
    assert done["data"]["result"] == {"model_version": "3"} and done["data"]["attempts"] == 3
    assert [int(e["sequence"]) for e in items] == sorted(int(e["sequence"]) for e in items)
    assert all(e["specversion"] == "1.0" and e["source"] == "/matih-ml" and e["time"].endswith("Z") for e in items)
    assert len({e["id"] for e in items}) == len(items)


def test_a_training_job_that_registers_a_version_raises_its_registry_events(store):
    jid = store.create_job("training", "iris", {}, "alice")["job_id"]
    store.transition_job(jid, "running")
    store.transition_job(jid, "succeeded", result={"run_id": "r9", "model_name": "iris", "model_version": "2",
                                                   "aliases": ["challenger"]})
    items, _ = Outbox(store).read()
    assert [(e["type"], e["subject"]) for e in items[2:]] == [
        ("training.job.succeeded", f"jobs/{jid}"), ("model.version.registered", "models/iris/versions/2"),
        ("model.version.alias_changed", "models/iris/versions/2"),
    ]
    assert items[3]["data"]["job_id"] == jid and items[3]["data"]["run_id"] == "r9"
    assert items[4]["data"] == {"model": "iris", "alias": "challenger", "version": "2", "job_id": jid}


def test_a_job_started_by_hand_is_queued_and_started_at_once(store):
    job = store.create_job("training", "manual", {}, "alice", running_as="raysubmit_1")
    assert _types(store) == [("training.job.queued", f"jobs/{job['job_id']}"),
                             ("training.job.started", f"jobs/{job['job_id']}")]
    store.create_job("training", "manual", {}, "alice", job_id=job["job_id"])  # idempotent: no new event
    assert len(_types(store)) == 2


def test_a_change_that_rolls_back_leaves_no_event(store):
    store.create_endpoint("iris", "iris@champion", "onnx", {}, "alice")
    with pytest.raises(Conflict):  # refused inside the transaction, after the row and its event were added
        store.create_endpoint("iris", "iris/1", "onnx", {}, "bob")

    def refuse():
        raise InvalidInput("target does not resolve")

    with pytest.raises(InvalidInput):
        store.update_endpoint("iris", {"target": "iris/9"}, "bob", verify=refuse)
    with pytest.raises(InvalidInput):
        store.create_endpoint("other", "iris/9", "onnx", {}, "bob", verify=refuse)
    jid = store.create_job("training", "j", {}, "a")["job_id"]
    with pytest.raises(Conflict):
        store.transition_job(jid, "succeeded")  # illegal from queued
    assert _types(store) == [("endpoint.created", "endpoints/iris"), ("training.job.queued", f"jobs/{jid}")]
    assert store.get_endpoint("iris")["target"] == "iris@champion"


def test_endpoint_events_carry_the_redacted_endpoint(store):
    secret = {"headers": {"Authorization": "Bearer s3cr3t"}, "url": "http://u:pw@triton:8000"}
    store.create_endpoint("remote", "iris@champion", "triton", secret, "alice")
    store.update_endpoint("remote", {"target": "iris/2"}, "bob")
    store.delete_endpoint("remote", "carol")
    items, _ = Outbox(store).read(type_="endpoint")
    assert [e["type"] for e in items] == ["endpoint.created", "endpoint.updated", "endpoint.deleted"]
    assert "s3cr3t" not in repr(items) and ":pw@" not in repr(items)
    assert "alice" not in repr(items) and "bob" not in repr(items)  # who did it stays in the audit log
    created, updated = items[0]["data"], items[1]["data"]
    assert created["config"]["headers"] == {"Authorization": "***"} and created["runtime"] == "triton"
    assert updated["target"] == "iris/2" and updated["before"]["target"] == "iris@champion"
    assert updated["changed"] == ["target"]
    assert {e["subject"] for e in items} == {"endpoints/remote"}


def test_registry_events_follow_completed_ops_and_alias_audits(store):
    op = store.begin_op("model_version.create", "iris", "alice", {"kind": "upload"})
    view = {"name": "iris", "version": "4", "run_id": "r1", "source": "s", "format": "onnx", "task": "classification",
            "stage": "none", "aliases": [], "tags": {"big": "x" * 100}}
    assert store.finish_op(op, "done", version="4", audit=("model_version.create", "model_version", "iris/4", None, view))
    assert not store.finish_op(op, "done", version="4", audit=("model_version.create", "model_version", "iris/4",
                                                               None, view))  # only the first completion counts
    rolled = store.begin_op("model_version.create", "iris", "alice", {"kind": "upload"})
    store.finish_op(rolled, "rolled_back", error="mlflow refused")
    stage = store.begin_op("model_version.stage", "iris", "alice", {"stage": "staging"}, version="4")
    store.finish_op(stage, "done", audit=("model_version.stage.staging", "model_version", "iris/4",
                                          {"stage": "none", "aliases": []}, {"stage": "staging", "aliases": ["staging"]}))
    store.record_audit("alice", "model.alias.set", "model", "iris", {"champion": None}, {"champion": "4"})
    store.record_audit("alice", "model.alias.set", "model", "iris", {"champion": "4"}, {"champion": "5"})
    store.record_audit("alice", "model.alias.delete", "model", "iris", {"champion": "5"}, None)
    store.record_audit("alice", "model.update", "model", "iris", {"description": ""}, {"description": "d"})
    items, _ = Outbox(store).read(type_="model.version")
    assert [(e["type"], e["subject"]) for e in items] == [
        ("model.version.registered", "models/iris/versions/4"),
        ("model.version.stage_changed", "models/iris/versions/4"),
        ("model.version.alias_changed", "models/iris/versions/4"),
        ("model.version.alias_changed", "models/iris/versions/5"),
        ("model.version.alias_changed", "models/iris/versions/5"),
    ]
    registered, staged = items[0]["data"], items[1]["data"]
    assert registered == {"model": "iris", "version": "4", "source_kind": "upload", "run_id": "r1", "source": "s",
                          "format": "onnx", "task": "classification", "stage": "none", "aliases": []}
    assert staged["stage"] == "staging" and staged["previous_stage"] == "none" and staged["aliases"] == ["staging"]
    assert [e["data"]["version"] for e in items[2:]] == ["4", "5", None]
    assert [e["data"]["previous_version"] for e in items[2:]] == [None, "4", "5"]


# -- reading --------------------------------------------------------------------------------------
def test_reading_filters_pages_and_continues_after_an_event(store):
    for i in range(5):
        store.create_endpoint(f"ep{i}", "m@champion", "onnx", {}, "a")
    jid = store.create_job("training", "j", {}, "a")["job_id"]
    outbox = Outbox(store)
    page1, tok = outbox.read(limit=2)
    page2, tok2 = outbox.read(limit=2, page_token=tok)
    page3, tok3 = outbox.read(limit=2, page_token=tok2)
    assert [e["subject"] for e in page1 + page2 + page3] == [f"endpoints/ep{i}" for i in range(5)] + [f"jobs/{jid}"]
    assert tok3 is None
    after, _ = outbox.read(since=page1[1]["id"])  # after an event id
    assert [e["subject"] for e in after][0] == "endpoints/ep2" and len(after) == 4
    after_seq, _ = outbox.read(since=page2[1]["sequence"])  # after a sequence
    assert [e["subject"] for e in after_seq] == ["endpoints/ep4", f"jobs/{jid}"]
    assert len(outbox.read(since=datetime.now(timezone.utc) - timedelta(minutes=5))[0]) == 6
    assert outbox.read(since=datetime.now(timezone.utc) + timedelta(minutes=5))[0] == []
    assert [e["type"] for e in outbox.read(type_="training")[0]] == ["training.job.queued"]
    assert outbox.read(type_="training.jo")[0] == []  # whole dotted words only
    assert len(outbox.read(type_="endpoint.created")[0]) == 5
    for bad in ({"since": "no-such-event"}, {"since": "a\x00b"}, {"since": "é"}, {"type_": "Training Job"}, {"type_": "a..b"}, {"page_token": "x"},
                {"type_": "%"}):
        with pytest.raises(InvalidInput):
            outbox.read(**bad)


# -- relaying ---------------------------------------------------------------------------------------
def test_relay_keeps_order_and_loses_nothing_while_the_sink_is_down(store):
    sink, clock = RecordingSink(), Clock()
    relay = EventRelay(_settings(retry_max_s=4.0), store, sink, clock=clock)
    jobs = [store.create_job("training", f"j{i}", {}, "a")["job_id"] for i in range(2)]
    assert relay.run_once() == 2
    sink.down = True
    for jid in jobs:
        store.transition_job(jid, "running")
    store.transition_job(jobs[0], "succeeded")
    store.create_endpoint("ep", "m@champion", "onnx", {}, "a")
    waits = []
    for _ in range(5):  # each failed round doubles the wait, up to retry_max_s
        assert relay.run_once() == 0
        waits.append(relay.seconds_until_due())
        assert relay.run_once() == 0  # still backing off: no attempt
        clock.now += waits[-1]
    assert waits == [0.5, 1.0, 2.0, 4.0, 4.0] and sink.refused == 5
    outbox = Outbox(store)
    assert outbox.depth() == 4
    first = store.engine.connect().execute(select(Event.attempts, Event.last_error).order_by(Event.id.desc())
                                           .where(Event.published_at.is_(None))).all()
    assert {a for a, _ in first[-3:]} == {5} and "down" in first[-1][1]  # the refused batch of three
    assert relay.status()["last_error"] == "recording sink is down" and relay.status()["depth"] == 4
    sink.down = False
    assert relay.drain() == 4
    assert outbox.depth() == 0 and relay.status()["last_error"] is None and relay.backoff_s() == 0
    sequences = [e.sequence for e in sink.events]
    assert sequences == sorted(sequences) and len(set(sequences)) == 6  # every event once, in outbox order
    per_job = [e.type for e in sink.events if e.subject == f"jobs/{jobs[0]}"]
    assert per_job == ["training.job.queued", "training.job.started", "training.job.succeeded"]
    assert [len(b) for b in sink.batches] == [2, 3, 1]


def test_relay_with_the_none_sink_leaves_events_readable_and_purges_old_ones(store):
    relay = EventRelay(_settings(), store, NoSink(), clock=Clock())
    store.create_endpoint("ep", "m@champion", "onnx", {}, "a")
    store.delete_endpoint("ep", "a")
    with store.engine.begin() as conn:  # the first as if written ten days ago
        first = conn.execute(select(func.min(Event.id))).scalar()
        conn.execute(update(Event).where(Event.id == first).values(time=datetime.now(timezone.utc) - timedelta(days=10)))
    assert relay.run_once() == 0
    assert _types(store) == [("endpoint.deleted", "endpoints/ep")]
    assert relay.status()["sink"] == "none" and relay.status()["depth"] == 1


def test_published_events_are_purged_after_keep_published_days(store):
    sink = RecordingSink()
    store.create_endpoint("ep", "m@champion", "onnx", {}, "a")
    EventRelay(_settings(), store, sink, clock=Clock()).run_once()
    store.update_endpoint("ep", {"target": "m/2"}, "a")
    with store.engine.begin() as conn:
        conn.execute(update(Event).where(Event.published_at.is_not(None))
                     .values(published_at=datetime.now(timezone.utc) - timedelta(days=8)))
    assert Outbox(store).purge(7) == 1
    assert _types(store) == [("endpoint.updated", "endpoints/ep")]


def test_sinks_are_a_registry_of_named_implementations():
    assert set(SINKS) == {"none", "kafka", "redis"}
    assert isinstance(make_sink(_settings()), NoSink)
    assert make_sink(load_settings("local", matih_home="/tmp/x", redis_url="redis://127.0.0.1:6379/0",
                                   events={"sink": "redis"})).name == "redis"
    with pytest.raises(ConfigError, match="KAFKA_BOOTSTRAP_SERVERS"):
        load_settings("local", matih_home="/tmp/x", events={"sink": "kafka"})


def test_event_types_of_every_job_kind():
    assert m.job_event_type("training", "running") == m.TRAINING_JOB_STARTED
    assert m.job_event_type("batch_prediction", "failed") == m.BATCH_JOB_FAILED
    assert m.job_event_type("materialize", "queued") == "materialize.job.queued"
    assert all(t.count(".") == 2 or t.startswith(("endpoint.", "rollout.", "abtest.", "monitor.", "alert.", "retrain.")) for t in m.EVENT_TYPES)


# -- the route ---------------------------------------------------------------------------------------
@pytest.fixture
def api(tmp_path):
    from app.api.app import create_app
    from app.api.events import router
    from app.bootstrap import prepare
    from tests.support import in_process_context

    settings = load_settings("local", matih_home=str(tmp_path))
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, jobs=None)
    app = create_app(ctx)
    if not any(getattr(r, "path", "") == "/v1/events" for r in app.routes):
        app.include_router(router(ctx))
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
    yield ctx.store, client
    ctx.store.dispose()


def test_get_events_route(api):
    store, client = api
    _, viewer_token = store.create_token("v", "viewer", "admin")
    jid = store.create_job("training", "iris", {}, "alice")["job_id"]
    store.create_endpoint("ep", "m@champion", "onnx", {}, "a")
    r = client.get("/v1/events", headers={"Authorization": f"Bearer {viewer_token}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert [e["type"] for e in body["items"]] == ["training.job.queued", "endpoint.created"]
    assert body["items"][0]["subject"] == f"jobs/{jid}" and body["next_page_token"] is None
    assert client.get("/v1/events", params={"type": "endpoint"}).json()["items"][0]["subject"] == "endpoints/ep"
    first = body["items"][0]["id"]
    assert [e["type"] for e in client.get("/v1/events", params={"since": first}).json()["items"]] == ["endpoint.created"]
    assert len(client.get("/v1/events", params={"since": "2000-01-01T00:00:00Z"}).json()["items"]) == 2
    page = client.get("/v1/events", params={"limit": 1}).json()
    assert len(page["items"]) == 1 and page["next_page_token"]
    for bad in ({"since": "2026-13-01T00:00:00Z"}, {"since": "nope"}, {"type": "A B"}, {"limit": 0},
                {"limit": 5000}, {"page_token": "zzz"}, {"since": "9999-12-31T23:59:59-14:00"}, {"since": "x" * 200}):
        r = client.get("/v1/events", params=bad)
        assert r.status_code == 422, (bad, r.status_code, r.text)
        assert "error" in r.json()
    assert client.get("/v1/events", headers={"Authorization": ""}).status_code == 401
    nasty = ["²", "١", "+1", " 1", "01", "0", "-1", "1e3", "é", "\x00", "%", "..", "a" * 300, "2026-01-01T00:00:00+99:00",
             "-", ":", "T", "99999999999999999999", "9" * 18]
    for value in nasty:  # as tests/integration/test_fuzz.py tries them: never a 5xx
        for param in ("since", "type", "page_token", "limit"):
            r = client.get("/v1/events", params={param: value})
            assert r.status_code < 500, (param, value, r.status_code, r.text)
