"""The StreamIngestor actor on the shared platform (online store: Redis): a push source declared
with a Kafka topic (the session's Tansu broker), 10,000 JSON rows produced, all readable online
within 5 s of the last one; the actor killed mid-stream resumes from the committed offsets
without a gap; GET /v1/features/streams shows the source, its rows and lag."""

from __future__ import annotations

import json
import threading
import time
import uuid

import ray

from app.features.repo import open_store
from tests.unit.test_features_push import declare, online

N = 10_000


def _produce(kafka, topic: str, start_ts: float, offset: int = 0, pace_s: float = 0.0) -> float:
    """N rows (driver i: trips = i + offset); returns the time the last one was acknowledged."""
    from confluent_kafka import Producer

    p = Producer({"bootstrap.servers": kafka.bootstrap, "linger.ms": 5})
    for i in range(N):
        p.produce(topic, key=str(i).encode(), value=json.dumps(
            {"driver_id": i, "conv_rate": i / 100, "trips": i + offset, "city": "x", "event_ts": start_ts + i / 1e6}))
        if pace_s and i % 500 == 499:
            p.poll(0)
            time.sleep(pace_s)
    assert p.flush(30) == 0
    return time.monotonic()


def _all_readable(store, offset: int, deadline: float) -> bool:
    ids = list(range(N))
    while time.monotonic() < deadline:
        if [g["trips"] for g in online(store, "it_clicks", ids)] == [i + offset for i in ids]:
            return True
        time.sleep(0.1)
    return False


def _stream(platform) -> dict:
    with platform.client() as c:
        r = c.get("/v1/features/streams")
        assert r.status_code == 200, r.text
        return {i["push_source"]: i for i in r.json()["items"]}.get("it_clicks", {})


def test_stream_to_online_kill_and_resume(platform, kafka):
    from confluent_kafka.admin import AdminClient, NewTopic

    store = open_store(platform.settings)
    data = platform.home / "feature_data"
    data.mkdir(exist_ok=True)
    topic = f"it-clicks-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(10)
    declare(store, data, "it_clicks", ("kafka", topic))

    deadline = time.monotonic() + 60  # the ingestor's next rescan (features.stream_rescan_s) picks it up
    while _stream(platform).get("state") != "running" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _stream(platform).get("state") == "running", _stream(platform)

    last = _produce(kafka, topic, start_ts=1_700_000_000)
    assert _all_readable(store, 0, last + 5.0), "10,000 rows not all readable online within 5 s of the last one"

    # Mid-stream kill: a second round of newer values, paced, the actor killed while it flows.
    handle = ray.get_actor("StreamIngestor", namespace="matih")
    started = ray.get(handle.status.remote(), timeout=30)["started_at"]
    done = {}
    producer = threading.Thread(target=lambda: done.setdefault(
        "last", _produce(kafka, topic, start_ts=1_800_000_000, offset=N, pace_s=0.05)))
    producer.start()
    time.sleep(0.4)
    ray.kill(handle, no_restart=False)
    producer.join(60)
    assert _all_readable(store, N, time.monotonic() + 90), "rows lost across the StreamIngestor's restart"

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        s = _stream(platform)
        if s.get("lag") == 0 and s.get("state") == "running":
            break
        time.sleep(0.5)
    assert s["lag"] == 0 and s["kind"] == "kafka" and s["topic"] == topic, s
    assert ray.get(handle.status.remote(), timeout=30)["started_at"] != started  # it did restart
    assert s["rows"] > 0 and s["dead_letters"] == 0 and s["last_event_time"].startswith("2027-01-15"), s
