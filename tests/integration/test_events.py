"""Events on the session's platform, published by the EventRelay actor to a real Kafka-protocol
broker (Tansu, started by the session on a free loopback port): a consumer group reads every
event of a training job in order; with the broker stopped, events accumulate in the outbox
and all arrive after it restarts on the same port."""

from __future__ import annotations

import json
import uuid

import ray

from actors.event_relay import find_event_relay
from tests.kafka import consume
from tests.support import wait_until

TOPIC = "matih.events"


def _read_until(consumer, done, timeout: float = 90) -> list[dict]:
    """CloudEvents read by ``consumer`` until ``done(events)`` holds."""
    events: list[dict] = []

    def more():
        events.extend(json.loads(m.value()) for m in consume(consumer, 1, timeout=2))
        return done(events)

    wait_until(more, timeout=timeout, every=0)
    return events


def _relay_status() -> dict:
    relay = find_event_relay()
    assert relay is not None, "the application builder creates the event_relay actor"
    return ray.get(relay.status.remote(), timeout=30)


def test_a_consumer_group_reads_every_event_of_a_training_job_in_order(platform, kafka, iris):
    subject = f"jobs/{iris['job_id']}"
    version = str(iris["result"]["model_version"])
    consumer = kafka.consumer(f"readers-{uuid.uuid4().hex[:6]}", TOPIC)
    try:
        # Events of different subjects may sit in different partitions, read independently:
        # read until the last event of each subject is in.
        events = _read_until(consumer, lambda evs: any(
            e["subject"] == f"models/iris/versions/{version}" and e["type"] == "model.version.alias_changed"
            for e in evs) and any(e["subject"] == subject and e["type"] == "training.job.succeeded" for e in evs))
    finally:
        consumer.close()
    mine = [e for e in events if e["subject"] == subject]
    assert [e["type"] for e in mine] == ["training.job.queued", "training.job.started", "training.job.succeeded"]
    assert [int(e["sequence"]) for e in mine] == sorted(int(e["sequence"]) for e in mine)
    assert mine[-1]["data"]["result"]["model_version"] == iris["result"]["model_version"]
    assert all(e["specversion"] == "1.0" and e["source"] == "/matih-ml" for e in events)
    registered = [e for e in events if e["type"] == "model.version.registered"
                  and e["subject"] == f"models/iris/versions/{version}"]
    assert len(registered) == 1 and registered[0]["data"]["job_id"] == iris["job_id"]
    # the same events through the API, whatever the sink
    with platform.client() as c:
        r = c.get("/v1/events", params={"type": "training.job", "limit": 1000})
        assert r.status_code == 200, r.text
        assert [e["id"] for e in r.json()["items"] if e["subject"] == subject] == [e["id"] for e in mine]


def test_events_wait_in_the_outbox_while_the_broker_is_down_and_all_arrive_after_it_restarts(platform, kafka, iris):
    name = f"events-{uuid.uuid4().hex[:6]}"
    pinned = f"iris/{iris['result']['model_version']}"
    kafka.stop()
    try:
        with platform.client() as c:
            r = c.post("/v1/endpoints", json={"name": name, "target": "iris@champion"})
            assert r.status_code == 201, r.text
            assert c.put(f"/v1/endpoints/{name}", json={"target": pinned}).status_code == 200
            assert c.delete(f"/v1/endpoints/{name}").status_code == 204
            listed = c.get("/v1/events", params={"type": "endpoint", "limit": 1000}).json()["items"]
        written = [e for e in listed if e["subject"] == f"endpoints/{name}"]
        assert [e["type"] for e in written] == ["endpoint.created", "endpoint.updated", "endpoint.deleted"]
        # the relay tried, failed, and holds them (nothing skipped, nothing marked published)
        status = wait_until(lambda: (s := _relay_status())["last_error"] and s["depth"] >= 3 and s, timeout=60)
        assert status["sink"] == "kafka" and "Kafka" in status["last_error"]
    finally:
        kafka.start()  # the same port, empty storage: the topic starts over
    consumer = kafka.consumer(f"after-{uuid.uuid4().hex[:6]}", TOPIC)
    try:
        events = _read_until(consumer, lambda evs: any(
            e["subject"] == f"endpoints/{name}" and e["type"] == "endpoint.deleted" for e in evs))
    finally:
        consumer.close()
    arrived = [e for e in events if e["subject"] == f"endpoints/{name}"]
    assert [e["id"] for e in arrived] == [e["id"] for e in written]  # all of them, in order
    assert arrived[1]["data"]["target"] == pinned and arrived[1]["data"]["before"]["target"] == "iris@champion"
    status = wait_until(lambda: (s := _relay_status())["depth"] == 0 and s, timeout=60)
    assert status["last_error"] is None
