"""Streams into push sources: the StreamIngestor's core, plain Python (actors/stream_ingestor.py
runs it in a thread).

A push source declares its stream in the Feast registry (tags ``matih.stream.kind`` and
``matih.stream.topic``, app/features/repo.py). The :class:`Ingestor` re-reads those
declarations every ``features.stream_rescan_s``, keeps one :class:`StreamConsumer` per source,
and in each round takes a micro-batch of up to ``features.stream_batch_rows`` JSON rows
(waiting at most ``features.stream_poll_s``), writes the rows that convert through Feast's push
API (app/features/push.py), and only then commits the batch's position (Kafka offsets, Redis
XACK). Delivery is therefore at least once: a crash between write and commit sends the batch
again, which the online store absorbs (per entity key it keeps the latest event time). A
message that is not a JSON object, or a row that lacks a column or does not convert, is
counted (``dead_letters``) and committed past: it never stalls the stream. While the broker
or the online store is down the batch stays uncommitted and the round is retried with backoff.

Consumers are a registry of named implementations (:data:`CONSUMERS`): ``kafka``
(confluent-kafka, partitions assigned explicitly, offsets committed to the consumer group
``matih-features.<project>.<source>``) and ``redis`` (a consumer group of the same name on the
stream key: XREADGROUP, XACK after the write; its own pending entries are read again first
after a restart).
"""

from __future__ import annotations

import importlib
import json
import logging
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Callable

from app.errors import InvalidInput
from app.features.push import PushSpec, frame, push_spec, write_frame
from app.features.repo import STREAM_KIND_TAG, STREAM_TOPIC_TAG

log = logging.getLogger(__name__)

# Longest pause between retries while a broker or the online store is down.
_MAX_BACKOFF_S = 5.0
# How often lag is measured (a broker round trip per partition).
_LAG_EVERY_S = 1.0


@dataclass
class Message:
    """One message of a stream: its payload (bytes or, from Redis, the entry's fields) and the
    consumer's handle for committing it."""

    value: Any
    position: Any


class StreamConsumer(ABC):
    """Reads one stream for one push source, in a consumer group named ``group``."""

    kind: str = ""

    def __init__(self, topic: str, group: str, settings):
        self.topic = topic
        self.group = group
        self.settings = settings

    @abstractmethod
    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        """Up to ``max_messages`` not yet committed, waiting at most ``timeout_s`` for the
        first; raises on a broker error (the caller backs off)."""

    @abstractmethod
    def commit(self, messages: list[Message]) -> None:
        """Mark ``messages`` done (after their rows were written)."""

    @abstractmethod
    def lag(self) -> int | None:
        """Messages in the stream not yet committed (None: unknown now)."""

    def decode(self, message: Message) -> Any:
        """The row of a message: a JSON object (bytes or str); ValueError otherwise."""
        value = message.value
        if isinstance(value, (bytes, bytearray)):
            value = value.decode("utf-8")
        row = json.loads(value)
        if not isinstance(row, dict):
            raise ValueError("not a JSON object")
        return row

    def refresh(self) -> None:
        """Called at each rescan: pick up what changed on the broker (Kafka: new partitions)."""

    def close(self) -> None:
        """Release the connection without committing anything more."""


class KafkaStreamConsumer(StreamConsumer):
    """A Kafka topic (``KAFKA_BOOTSTRAP_SERVERS``). The topic's partitions are assigned to this
    single consumer (the StreamIngestor is a singleton: no group rebalance to wait for after a
    restart); it starts at the group's committed offsets, else at the earliest, and commits
    synchronously after each write."""

    kind = "kafka"

    def __init__(self, topic: str, group: str, settings):
        from confluent_kafka import Consumer

        super().__init__(topic, group, settings)
        if not settings.kafka_bootstrap_servers:
            raise InvalidInput(f"stream {topic!r} is on Kafka but KAFKA_BOOTSTRAP_SERVERS is not set")
        self._consumer = Consumer({
            "bootstrap.servers": settings.kafka_bootstrap_servers, "group.id": group,
            "enable.auto.commit": False, "enable.auto.offset.store": False, "auto.offset.reset": "earliest",
            "topic.metadata.refresh.interval.ms": 5000, "fetch.wait.max.ms": 50,
        })
        self._partitions: list[int] = []
        self._committed: dict[int, int] = {}
        self._lag: int | None = None
        self._lag_at = 0.0

    def _assign(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition

        meta = self._consumer.list_topics(self.topic, timeout=5)
        topic = meta.topics.get(self.topic)
        parts = sorted(topic.partitions) if topic is not None and not topic.error else []
        if not parts or parts == self._partitions:
            return
        committed = self._consumer.committed([TopicPartition(self.topic, p) for p in parts], timeout=10)
        assign = []
        for tp in committed:
            start = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self._committed[tp.partition] = max(tp.offset, 0)
            assign.append(TopicPartition(self.topic, tp.partition, start))
        self._consumer.assign(assign)
        self._partitions = parts

    def refresh(self) -> None:
        self._assign()  # re-assigns (from the committed offsets) only when the partitions changed

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        from confluent_kafka import KafkaError

        if not self._partitions:
            self._assign()
            if not self._partitions:
                time.sleep(timeout_s)
                return []
        out: list[Message] = []
        deadline = time.monotonic() + timeout_s
        while len(out) < max_messages:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            got = self._consumer.consume(num_messages=max_messages - len(out), timeout=left)
            for msg in got:
                err = msg.error()
                if err is None:
                    out.append(Message(msg.value(), (msg.partition(), msg.offset())))
                elif err.code() != KafkaError._PARTITION_EOF:
                    if err.fatal() or not out:
                        raise RuntimeError(f"kafka: {err.str()}")
            if out and not got:
                break
        return out

    def commit(self, messages: list[Message]) -> None:
        from confluent_kafka import TopicPartition

        ends: dict[int, int] = {}
        for m in messages:
            part, offset = m.position
            ends[part] = max(ends.get(part, -1), offset + 1)
        if ends:
            self._consumer.commit(offsets=[TopicPartition(self.topic, p, o) for p, o in ends.items()],
                                  asynchronous=False)
            self._committed.update(ends)

    def lag(self) -> int | None:
        from confluent_kafka import TopicPartition

        if time.monotonic() - self._lag_at < _LAG_EVERY_S:
            return self._lag
        self._lag_at = time.monotonic()
        try:
            if not self._partitions:
                self._assign()
            total = 0
            for p in self._partitions:
                _, high = self._consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=2, cached=False)
                total += max(high - self._committed.get(p, 0), 0)
            self._lag = total
        except Exception:  # noqa: BLE001 - the broker is down: lag unknown
            self._lag = None
        return self._lag

    def close(self) -> None:
        self._consumer.close()


class RedisStreamConsumer(StreamConsumer):
    """A Redis stream key (``REDIS_URL``) in a consumer group created at id 0 on first use (the
    entries already in the stream are read too). Each entry is one row: a field ``data`` holding the JSON object, or the
    entry's fields themselves (values as strings, converted by the view's types). The
    consumer's own pending entries (read, not acknowledged: a crash before XACK) come first."""

    kind = "redis"
    CONSUMER = "ingestor"

    def __init__(self, topic: str, group: str, settings):
        import redis

        super().__init__(topic, group, settings)
        if not settings.redis_url:
            raise InvalidInput(f"stream {topic!r} is on Redis but REDIS_URL is not set")
        self._redis = redis.Redis.from_url(settings.redis_url, socket_timeout=10)
        self._ready = False
        self._pending = True  # re-read our own unacknowledged entries first

    def _ensure_group(self) -> None:
        import redis

        if self._ready:
            return
        try:
            self._redis.xgroup_create(self.topic, self.group, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._ready = True

    def poll(self, max_messages: int, timeout_s: float) -> list[Message]:
        self._ensure_group()
        if self._pending:
            got = self._redis.xreadgroup(self.group, self.CONSUMER, {self.topic: "0"}, count=max_messages)
            entries = got[0][1] if got else []
            if entries:
                return [Message(fields, entry_id) for entry_id, fields in entries]
            self._pending = False
        got = self._redis.xreadgroup(self.group, self.CONSUMER, {self.topic: ">"}, count=max_messages,
                                     block=max(int(timeout_s * 1000), 1))
        entries = got[0][1] if got else []
        return [Message(fields, entry_id) for entry_id, fields in entries]

    def decode(self, message: Message) -> Any:
        fields = message.value
        if isinstance(fields, dict):
            if b"data" in fields:
                return super().decode(Message(fields[b"data"], message.position))
            return {k.decode(): v.decode() for k, v in fields.items()}
        return super().decode(message)

    def commit(self, messages: list[Message]) -> None:
        if messages:
            self._redis.xack(self.topic, self.group, *[m.position for m in messages])

    def lag(self) -> int | None:
        try:
            for group in self._redis.xinfo_groups(self.topic):
                if group["name"] in (self.group, self.group.encode()):
                    lag = group.get("lag")
                    return int(lag or 0) + int(group.get("pending") or 0)
        except Exception:  # noqa: BLE001 - Redis down or no stream yet
            return None
        return None

    def close(self) -> None:
        self._redis.close()


# kind -> "module:Class" (Feast's short-name table in repo_config.py, here for stream consumers).
CONSUMERS: dict[str, str] = {
    "kafka": "app.features.streams:KafkaStreamConsumer",
    "redis": "app.features.streams:RedisStreamConsumer",
}


def consumer_class(kind: str) -> type[StreamConsumer]:
    """The consumer implementation of a stream ``kind``; InvalidInput naming the known ones."""
    if kind not in CONSUMERS:
        raise InvalidInput(f"stream kind {kind!r} is not one of {', '.join(sorted(CONSUMERS))}")
    module, name = CONSUMERS[kind].split(":")
    return getattr(importlib.import_module(module), name)


def group_name(project: str, source: str) -> str:
    """The consumer group of a push source's stream (one per Feast project and source)."""
    return f"matih-features.{project}.{source}"


@dataclass
class SourceStats:
    """What the ingestor did for one push source since it started."""

    source: str
    kind: str
    topic: str
    rows: int = 0
    batches: int = 0
    dead_letters: int = 0
    errors: int = 0
    last_error: str | None = None
    last_event_time: datetime | None = None
    last_write_at: datetime | None = None
    freshness_s: float | None = None  # write time - newest event time of the last batch
    lag: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "push_source": self.source, "kind": self.kind, "topic": self.topic, "rows": self.rows,
            "batches": self.batches, "dead_letters": self.dead_letters, "errors": self.errors,
            "last_error": self.last_error, "lag": self.lag, "freshness_s": self.freshness_s,
            "last_event_time": self.last_event_time.isoformat() if self.last_event_time else None,
            "last_write_at": self.last_write_at.isoformat() if self.last_write_at else None,
        }


@dataclass
class _Source:
    spec: PushSpec
    consumer: StreamConsumer
    stats: SourceStats
    to: str = "online"
    backoff_s: float = 0.0
    retry_at: float = 0.0
    held: list[Message] = field(default_factory=list)  # polled, not yet written and committed


def declared_streams(store, allow_cache: bool = False) -> dict[str, tuple[str, str]]:
    """``{push source: (kind, topic)}`` of the push sources with a stream declaration (from the
    registry itself, or with ``allow_cache`` from the store's cached copy)."""
    from feast.data_source import PushSource

    out = {}
    for source in store.list_data_sources(allow_cache=allow_cache):
        tags = source.tags or {}
        if isinstance(source, PushSource) and tags.get(STREAM_KIND_TAG) and tags.get(STREAM_TOPIC_TAG):
            out[source.name] = (tags[STREAM_KIND_TAG], tags[STREAM_TOPIC_TAG])
    return out


class Ingestor:
    """Consumes every declared stream into its push source (see the module docstring).
    ``run_once`` is one round over the sources; ``run`` loops until ``stop`` is set.
    ``on_batch(source, rows, dead, lag, freshness_s)`` is called after each committed batch
    (the actor's metrics)."""

    def __init__(self, settings, store=None, on_batch: Callable[..., None] | None = None):
        from app.features.repo import open_store

        self.settings = settings
        self.store = store if store is not None else open_store(settings)
        self.on_batch = on_batch
        self._sources: dict[str, _Source] = {}
        self._failed: dict[str, SourceStats] = {}  # declared but not consumable (bad kind, no broker URL)
        self._scanned_at = 0.0
        self._lock = threading.Lock()
        self.started_at = datetime.now(timezone.utc)
        self.rounds = 0

    # -- declarations

    def rescan(self) -> None:
        """Open consumers for newly declared streams, close those no longer declared."""
        self._scanned_at = time.monotonic()
        # One snapshot of the registry for the declarations and the views they feed (push_spec
        # reads the cached copy): a stream declared with its view is never seen without it.
        self.store.refresh_registry()
        declared = declared_streams(self.store, allow_cache=True)
        project = self.settings.features.project
        with self._lock:
            for name in list(self._sources):
                src = self._sources[name]
                if declared.get(name) != (src.stats.kind, src.stats.topic):
                    src.consumer.close()
                    del self._sources[name]
            for name in list(self._failed):
                if name not in declared:
                    del self._failed[name]
            for name, (kind, topic) in declared.items():
                if name in self._sources:
                    src = self._sources[name]
                    try:  # the views may have changed (a feature added), the topic its partitions
                        src.spec = push_spec(self.store, name)
                        if not src.held:
                            src.consumer.refresh()
                    except Exception:  # noqa: BLE001 - keep what we have; retried at the next scan
                        pass
                    continue
                stats = SourceStats(name, kind, topic)
                try:
                    spec = push_spec(self.store, name)
                    consumer = consumer_class(kind)(topic, group_name(project, name), self.settings)
                except Exception as exc:  # noqa: BLE001 - reported per source, retried at the next scan
                    stats.errors += 1
                    stats.last_error = str(getattr(exc, "message", exc))
                    self._failed[name] = stats
                    continue
                self._failed.pop(name, None)
                self._sources[name] = _Source(spec, consumer, stats)

    # -- the loop

    def run_once(self) -> int:
        """One round: rescan when due, then one micro-batch per source. Returns rows written."""
        if time.monotonic() - self._scanned_at >= self.settings.features.stream_rescan_s:
            try:
                self.rescan()
            except Exception:  # noqa: BLE001 - the registry is down: keep the sources we have
                log.exception("stream ingestor: rescan failed")
        self.rounds += 1
        with self._lock:
            sources = list(self._sources.values())
        if not sources:
            time.sleep(self.settings.features.stream_poll_s)
            return 0
        poll_s = self.settings.features.stream_poll_s / len(sources)
        return sum(self._round(src, poll_s) for src in sources)

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.run_once()
            except Exception:  # noqa: BLE001 - never let the loop die; each source records its own errors
                log.exception("stream ingestor round failed")
                stop.wait(1.0)

    def _round(self, src: _Source, poll_s: float) -> int:
        now = time.monotonic()
        if now < src.retry_at:
            return 0
        stats = src.stats
        try:
            if not src.held:
                src.held = src.consumer.poll(self.settings.features.stream_batch_rows, poll_s)
            written = self._write(src) if src.held else 0
            src.backoff_s = 0.0
        except Exception as exc:  # noqa: BLE001 - broker or online store down: the batch is kept, retried
            stats.errors += 1
            stats.last_error = f"{type(exc).__name__}: {exc}"
            src.backoff_s = min(max(src.backoff_s * 2, 0.2), _MAX_BACKOFF_S)
            src.retry_at = now + src.backoff_s
            log.warning("stream %s (%s %s): %s; retrying in %.1fs", stats.source, stats.kind, stats.topic,
                        stats.last_error, src.backoff_s)
            written = 0
        stats.lag = src.consumer.lag()
        return written

    def _write(self, src: _Source) -> int:
        """Decode, convert, push and commit the held batch (the commit comes last)."""
        stats = src.stats
        rows, dead = [], 0
        for message in src.held:
            try:
                rows.append(src.consumer.decode(message))
            except (ValueError, UnicodeDecodeError):
                dead += 1
        df, errors = frame(src.spec, rows)
        dead += len(errors)
        if not df.empty:
            write_frame(self.store, src.spec, df, src.to)
        src.consumer.commit(src.held)
        src.held = []
        now = datetime.now(timezone.utc)
        stats.rows += len(df)
        stats.batches += 1
        stats.dead_letters += dead
        if dead:
            log.warning("stream %s: %d bad messages skipped", stats.source, dead)
        freshness = None
        if not df.empty:
            newest = df[src.spec.timestamp_field].max().to_pydatetime()
            stats.last_event_time = max(newest, stats.last_event_time) if stats.last_event_time else newest
            freshness = (now - newest).total_seconds()
            stats.freshness_s = freshness
            stats.last_write_at = now
        if self.on_batch is not None:
            try:
                self.on_batch(stats.source, len(df), dead, src.consumer.lag(), freshness)
            except Exception:  # noqa: BLE001 - metrics never stop the stream
                log.exception("stream ingestor: on_batch failed")
        return len(df)

    # -- status

    def status(self) -> dict[str, Any]:
        """Every declared stream with its counters, lag and freshness."""
        with self._lock:
            streams = [s.stats.as_dict() for s in self._sources.values()]
            streams += [{**s.as_dict(), "state": "failed"} for s in self._failed.values()]
        for s in streams:
            s.setdefault("state", "running")
        return {"streams": sorted(streams, key=lambda s: s["push_source"]), "rounds": self.rounds,
                "started_at": self.started_at.isoformat()}

    def close(self) -> None:
        """Close every consumer. Held (polled, unwritten) messages are not committed: the next
        ingestor reads them again."""
        with self._lock:
            for src in self._sources.values():
                try:
                    src.consumer.close()
                except Exception:  # noqa: BLE001
                    pass
            self._sources.clear()
