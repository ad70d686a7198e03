"""app.features.streams in-process (no Ray): the Ingestor against a real Kafka-protocol broker
(Tansu, tests/kafka.py) and the machine's Redis, writing to a Redis online store under a Feast
project of this module's own. At least once across a "kill" (an ingestor that wrote a batch and
stopped before committing; a new one resumes from the committed position: every row readable,
the rewritten ones harmless), bad messages skipped and counted, lag."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import datetime, timezone

import pytest

from app.features.repo import open_store
from app.features.streams import CONSUMERS, Ingestor, consumer_class, declared_streams, group_name
from app.settings import load_settings
from tests.unit.test_features_push import declare, online

REDIS_URL = "redis://127.0.0.1:6379/0"
BASE_TS = 1_700_000_000


def row(i: int, ts: int | None = None) -> dict:
    return {"driver_id": i, "conv_rate": i / 10, "trips": i, "city": f"c{i % 7}", "event_ts": ts or BASE_TS + i}


def _redis_up() -> bool:
    import redis

    try:
        return bool(redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping())
    except Exception:  # noqa: BLE001
        return False


pytestmark = pytest.mark.skipif(not _redis_up(), reason="no Redis on 127.0.0.1:6379")


@pytest.fixture(scope="module")
def broker(tmp_path_factory):
    from tests.kafka import TansuBroker, tansu_binary

    if tansu_binary() is None:
        pytest.skip("no tansu binary")
    b = TansuBroker(tmp_path_factory.mktemp("tansu"))
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="module")
def env(tmp_path_factory, broker):
    home = tmp_path_factory.mktemp("home")
    project = f"t_{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        "local", matih_home=str(home), redis_url=REDIS_URL, kafka_bootstrap_servers=broker.bootstrap,
        features={"project": project, "online_store": "redis", "engine": "local", "stream_poll_s": 0.2,
                  "stream_batch_rows": 500, "stream_rescan_s": 0.2},
    )
    store = open_store(settings)
    yield settings, store, home
    import redis

    r = redis.Redis.from_url(REDIS_URL)
    for key in r.scan_iter(match=f"*{project}", count=1000):
        r.delete(key)


def produce_kafka(broker, topic: str, values: list, partitions: int = 3) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(10)
    p = Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 5})
    for i, v in enumerate(values):
        p.produce(topic, key=str(i).encode(), value=v if isinstance(v, bytes) else json.dumps(v).encode())
    assert p.flush(30) == 0


def wait_readable(store, name: str, ids: list[int], timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while True:
        got = online(store, name, ids)
        if all(g["trips"] == i for g, i in zip(got, ids)) or time.monotonic() > deadline:
            return got
        time.sleep(0.1)


def stat(ing: Ingestor, name: str) -> dict:
    """The status of push source ``name`` ({} before the first scan)."""
    empty = {"rows": 0, "lag": None, "dead_letters": 0}
    return {x["push_source"]: x for x in ing.status()["streams"]}.get(name, empty)


def run_until(ing: Ingestor, done, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not done() and time.monotonic() < deadline:
        ing.run_once()


def test_registry_of_consumers():
    assert set(CONSUMERS) == {"kafka", "redis"}
    assert consumer_class("redis").kind == "redis"
    with pytest.raises(Exception, match="not one of kafka, redis"):
        consumer_class("pulsar")


def test_kafka_stream_all_rows_online_bad_messages_skipped(env, broker):
    settings, store, home = env
    topic = f"t-{uuid.uuid4().hex[:8]}"
    declare(store, home, "kstream", ("kafka", topic))
    assert declared_streams(store)["kstream"] == ("kafka", topic)
    n = 3000
    bad = [b"not json", json.dumps([1, 2]).encode(), {"driver_id": 1}, {**row(5), "trips": "many"}]
    produce_kafka(broker, topic, [row(i) for i in range(n)] + bad)
    ing = Ingestor(settings, store)
    stop = threading.Event()
    t = threading.Thread(target=ing.run, args=(stop,), daemon=True)
    t.start()
    try:
        ids = list(range(0, n, 37)) + [n - 1]
        got = wait_readable(store, "kstream", ids)
        assert [g["trips"] for g in got] == ids
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            s = {x["push_source"]: x for x in ing.status()["streams"]}["kstream"]
            if s["rows"] + s["dead_letters"] == n + len(bad) and s["lag"] == 0:
                break
            time.sleep(0.2)
    finally:
        stop.set()
        t.join(10)
        ing.close()
    assert s["rows"] == n and s["dead_letters"] == len(bad) and s["lag"] == 0, s
    assert s["errors"] == 0 and s["state"] == "running" and s["freshness_s"] is not None
    assert s["last_event_time"] == datetime.fromtimestamp(BASE_TS + n - 1, timezone.utc).isoformat()


def test_kafka_kill_between_write_and_commit_resumes_without_gap(env, broker):
    settings, store, home = env
    settings = settings.model_copy(update={"features": settings.features.model_copy(update={"stream_batch_rows": 200})})
    topic = f"t-{uuid.uuid4().hex[:8]}"
    declare(store, home, "kkill", ("kafka", topic))
    n = 2000
    produce_kafka(broker, topic, [row(i) for i in range(n)])

    first = Ingestor(settings, store)
    run_until(first, lambda: stat(first, "kkill")["rows"] >= 600)
    committed = stat(first, "kkill")["rows"]
    # The "kill": a batch polled and written, the process gone before the commit.
    src = first._sources["kkill"]
    src.held = src.consumer.poll(200, 2.0)
    assert src.held
    rows = [src.consumer.decode(m) for m in src.held]
    from app.features.push import frame, write_frame
    write_frame(store, src.spec, frame(src.spec, rows)[0])
    first.close()

    second = Ingestor(settings, store)
    run_until(second, lambda: stat(second, "kkill")["lag"] == 0
              and stat(second, "kkill")["rows"] >= n - committed)
    s = stat(second, "kkill")
    second.close()
    # No gap: the second ingestor started at the committed offsets, so it rewrote the
    # uncommitted batch (harmless) and everything after it.
    assert s["rows"] == n - committed, (s, committed)
    ids = list(range(n))
    got = online(store, "kkill", ids)
    assert [g["trips"] for g in got] == ids
    assert got[123]["conv_rate"] == pytest.approx(12.3) and got[123]["city"] == "c4"


def test_redis_stream_pending_reread_after_kill_and_event_time_wins(env):
    import redis

    settings, store, home = env
    key = f"matih-test-stream:{uuid.uuid4().hex[:8]}"
    declare(store, home, "rstream", ("redis", key))
    r = redis.Redis.from_url(REDIS_URL)
    n = 1200
    try:
        for i in range(n):
            if i % 2:
                r.xadd(key, {"data": json.dumps(row(i))})
            else:  # a row as the entry's own fields
                r.xadd(key, {k: str(v) for k, v in row(i).items()})
        r.xadd(key, {"data": "{broken"})
        r.xadd(key, {"nothing": "useful"})

        first = Ingestor(settings, store)
        run_until(first, lambda: stat(first, "rstream")["rows"] >= 500)
        committed = stat(first, "rstream")["rows"]
        src = first._sources["rstream"]
        held = src.consumer.poll(300, 1.0)  # read (pending in the group), never acknowledged
        assert len(held) == 300
        first.close()

        second = Ingestor(settings, store)
        run_until(second, lambda: stat(second, "rstream")["lag"] == 0
                  and stat(second, "rstream")["rows"] + stat(second, "rstream")["dead_letters"]
                  >= n + 2 - committed)
        s = stat(second, "rstream")
        assert s["rows"] == n - committed and s["dead_letters"] == 2, (s, committed)
        assert [g["trips"] for g in online(store, "rstream", list(range(n)))] == list(range(n))
        info = {g["name"].decode(): g for g in r.xinfo_groups(key)}[group_name(settings.features.project, "rstream")]
        assert info["pending"] == 0

        # An older event of an entity changes nothing on Redis (per key the latest event time
        # wins): redelivered or late rows are harmless.
        r.xadd(key, {"data": json.dumps({**row(7), "trips": 999, "event_ts": BASE_TS - 100})})
        run_until(second, lambda: stat(second, "rstream")["rows"] >= s["rows"] + 1)
        assert online(store, "rstream", [7])[0]["trips"] == 7
        second.close()
    finally:
        r.delete(key)
