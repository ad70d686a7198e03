"""Streaming into the online store: rows/s through the StreamIngestor's core (in-process, no
Ray) from a Kafka topic (Tansu, tests/kafka.py) to Feast's Redis online store, and the p99
freshness: event time (the row's timestamp, set when it is produced) to the moment a poller
reads it online.

    PYTHONPATH=$PWD python -m benchmarks.features_streams [rows]

Throughput: ``rows`` rows produced first, then the ingestor started; the clock runs from its
first round to the commit of the last row. Freshness: ``fresh_rows`` rows produced at
``fresh_rate`` rows/s while the ingestor runs; every ``sample_every``-th row is polled online
every 10 ms until it reads back."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

REDIS_URL = "redis://127.0.0.1:6379/0"


def _declare(store, home: Path, name: str, topic: str) -> None:
    from tests.unit.test_features_push import declare

    declare(store, home, name, ("kafka", topic))


def _producer(broker, topic: str, partitions: int):
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": broker.bootstrap})
    admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])[topic].result(10)
    return Producer({"bootstrap.servers": broker.bootstrap, "linger.ms": 2})


def _row(i: int, ts: float) -> bytes:
    return json.dumps({"driver_id": i, "conv_rate": i / 10, "trips": i, "city": "b", "event_ts": ts}).encode()


def _percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def bench_streams(rows: int = 20_000, batch_rows: int = 2000, partitions: int = 3, fresh_rows: int = 3000,
                  fresh_rate: float = 1000.0, sample_every: int = 10) -> dict[str, Any]:
    """``{"rows", "seconds", "rows_per_s", "freshness_p50_s", "freshness_p99_s", ...}``."""
    from app.features.repo import open_store
    from app.features.streams import Ingestor
    from app.settings import load_settings
    from tests.kafka import TansuBroker
    from tests.unit.test_features_push import online

    import redis

    home = Path(tempfile.mkdtemp(prefix="bench-streams-"))
    broker = TansuBroker(home)
    broker.start()
    project = f"b_{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        "local", matih_home=str(home), redis_url=REDIS_URL, kafka_bootstrap_servers=broker.bootstrap,
        features={"project": project, "online_store": "redis", "engine": "local", "stream_poll_s": 0.05,
                  "stream_batch_rows": batch_rows, "stream_rescan_s": 60},
    )
    store = open_store(settings)
    try:
        # Throughput: a backlog of `rows`, drained.
        topic = f"bench-{uuid.uuid4().hex[:8]}"
        _declare(store, home, "bench", topic)
        producer = _producer(broker, topic, partitions)
        now = time.time()
        for i in range(rows):
            producer.produce(topic, _row(i, now), key=str(i).encode())
            if i % 10_000 == 0:
                producer.poll(0)
        producer.flush(60)
        ing = Ingestor(settings, store)
        ing.rescan()
        stats = ing._sources["bench"].stats
        start = time.perf_counter()
        while stats.rows < rows and time.perf_counter() - start < 300:
            ing.run_once()
        seconds = time.perf_counter() - start
        drained = stats.rows
        assert online(store, "bench", [rows - 1])[0]["trips"] == rows - 1

        # Freshness: a steady stream, sampled rows polled online until they read back.
        topic2 = f"fresh-{uuid.uuid4().hex[:8]}"
        _declare(store, home, "fresh", topic2)
        ing.rescan()
        stop = threading.Event()
        runner = threading.Thread(target=ing.run, args=(stop,), daemon=True)
        runner.start()
        producer2 = _producer(broker, topic2, partitions)
        pending: dict[int, float] = {}
        lock = threading.Lock()
        latencies: list[float] = []
        done = threading.Event()

        def poll() -> None:
            reader = open_store(settings, fresh=True)
            while not (done.is_set() and not pending):
                with lock:
                    ids = list(pending)
                if ids:
                    got = online(reader, "fresh", ids)
                    seen = time.time()
                    with lock:
                        for g in got:
                            if g["trips"] is not None and g["driver_id"] in pending:
                                latencies.append(seen - pending.pop(g["driver_id"]))
                time.sleep(0.01)

        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        t0 = time.time()
        for i in range(fresh_rows):
            target = t0 + i / fresh_rate
            delay = target - time.time()
            if delay > 0:
                time.sleep(delay)
            ts = time.time()
            producer2.produce(topic2, _row(i, ts), key=str(i).encode())
            producer2.poll(0)
            if i % sample_every == 0:
                with lock:
                    pending[i] = ts
        producer2.flush(30)
        done.set()
        poller.join(60)
        stop.set()
        runner.join(10)
        ing.close()
        return {
            "rows": drained, "seconds": round(seconds, 3), "rows_per_s": round(drained / seconds),
            "batch_rows": batch_rows, "partitions": partitions,
            "fresh_rows": fresh_rows, "fresh_rate": fresh_rate, "samples": len(latencies),
            "lost_samples": len(pending),
            "freshness_p50_s": round(_percentile(latencies, 0.5), 4),
            "freshness_p99_s": round(_percentile(latencies, 0.99), 4),
            "freshness_max_s": round(max(latencies), 4),
        }
    finally:
        broker.stop()
        r = redis.Redis.from_url(REDIS_URL)
        for key in r.scan_iter(match=f"*{project}", count=1000):
            r.delete(key)


if __name__ == "__main__":
    print(json.dumps(bench_streams(*(int(a) for a in sys.argv[1:2])), indent=2))
