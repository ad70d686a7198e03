"""Where the relay publishes events: one small interface, a registry of named sinks
(``events.sink``: ``kafka``, ``redis``, ``none``), as Feast's ``OnlineStore`` and its
short-name table.

Every sink is at-least-once: ``publish`` returns only once the broker acknowledged the
whole batch, and raises otherwise, after which the relay sends the batch again (consumers
may see an event twice and drop the repeat by its ``id``). Order within a subject holds
because the relay sends batches one at a time, in outbox order, and each sink keeps the
order of a batch (Kafka: the subject is the key, hence the partition; Redis: one stream).
"""

from __future__ import annotations

import importlib
import json
import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence

from app.errors import DependencyUnavailable, InvalidInput
from app.events.model import CloudEvent
from app.redaction import redact

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/cloudevents+json"


class EventSink(ABC):
    """Publishes batches of events to a broker."""

    name: str = ""

    @abstractmethod
    def publish(self, events: Sequence[CloudEvent]) -> None:
        """Send ``events`` in order; return once the broker holds all of them. Raises
        DependencyUnavailable (naming the broker) when it does not: nothing of the batch counts
        as published, and the relay sends it all again."""

    def close(self) -> None:
        """Release connections; the sink is not used afterwards."""


class NoSink(EventSink):
    """``none``: events stay in the outbox table alone (``GET /v1/events``); nothing is sent,
    and the relay marks nothing published (see :class:`app.events.relay.EventRelay`)."""

    name = "none"

    def __init__(self, settings=None):
        pass

    def publish(self, events: Sequence[CloudEvent]) -> None:
        raise NotImplementedError("NoSink publishes nothing; the relay does not call it")


def _payload(event: CloudEvent) -> bytes:
    return json.dumps(event.to_json(), separators=(",", ":"), default=str).encode()


class KafkaSink(EventSink):
    """Kafka (or any Kafka-protocol broker) through confluent-kafka's Producer: one topic
    (``events.topic``), the subject as the message key, the CloudEvent as the value in
    structured mode (``content-type: application/cloudevents+json`` header).

    The producer is idempotent (``enable.idempotence``: no duplicates or reordering from its
    own retries), and its messages time out with the round (``message.timeout.ms`` =
    ``events.publish_timeout_s``), so a batch that was not acknowledged in time fails as a
    whole and is not still queued inside the producer when the relay sends it again."""

    name = "kafka"

    def __init__(self, settings):
        if not settings.kafka_bootstrap_servers:
            raise InvalidInput("events.sink kafka needs KAFKA_BOOTSTRAP_SERVERS (host:port of the brokers)")
        self.servers = settings.kafka_bootstrap_servers
        self.topic = settings.events.topic
        self.timeout_s = settings.events.publish_timeout_s
        self._producer = None

    def _make_producer(self):
        from confluent_kafka import Producer

        timeout_ms = int(self.timeout_s * 1000)
        return Producer({
            "bootstrap.servers": self.servers,
            "enable.idempotence": True,
            "acks": "all",
            "message.timeout.ms": timeout_ms,
            "socket.connection.setup.timeout.ms": max(1000, min(timeout_ms, 30000)),
            "reconnect.backoff.max.ms": 2000,
            "client.id": "matih-event-relay",
        }, logger=logging.getLogger("app.events.kafka"))

    def publish(self, events: Sequence[CloudEvent]) -> None:
        from confluent_kafka import KafkaException

        if not events:
            return
        if self._producer is None:
            self._producer = self._make_producer()
        failures: list[str] = []

        def delivered(err, _msg) -> None:
            if err is not None:
                failures.append(str(err))

        try:
            for event in events:
                self._producer.produce(
                    self.topic, key=event.subject.encode(), value=_payload(event), on_delivery=delivered,
                    headers={"content-type": CONTENT_TYPE},
                )
            left = self._producer.flush(self.timeout_s + 1.0)
        except (KafkaException, BufferError) as exc:
            left, failures = -1, [str(exc)]
        if left or failures:
            self._discard()
            why = failures[0] if failures else f"{left} message(s) not acknowledged in {self.timeout_s}s"
            raise DependencyUnavailable(f"Kafka at {redact(self.servers)} did not take the events: {why}")

    def _discard(self) -> None:
        """Drop the producer after a failed round: what it still holds would otherwise be sent
        after the retry began (the next round starts a fresh one)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                producer.purge()
                producer.flush(0)
            except Exception:  # a producer being thrown away: nothing more to do with it
                log.debug("discarding the Kafka producer failed", exc_info=True)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(self.timeout_s)
            self._producer = None


class RedisSink(EventSink):
    """Redis Streams: ``XADD events.stream MAXLEN ~ events.stream_maxlen`` per event, a whole
    batch in one MULTI/EXEC pipeline (all or nothing). Each entry has the fields ``event``
    (the CloudEvent JSON), ``type``, ``subject`` and ``id``; read them with XREADGROUP."""

    name = "redis"

    def __init__(self, settings):
        import redis

        if not settings.redis_url:
            raise InvalidInput("events.sink redis needs REDIS_URL (redis://host:port/db)")
        self.url = settings.redis_url
        self.stream = settings.events.stream
        self.maxlen = settings.events.stream_maxlen
        timeout = settings.events.publish_timeout_s
        self._client = redis.Redis.from_url(self.url, socket_timeout=timeout, socket_connect_timeout=timeout)

    def publish(self, events: Sequence[CloudEvent]) -> None:
        import redis

        if not events:
            return
        try:
            with self._client.pipeline(transaction=True) as pipe:
                for event in events:
                    pipe.xadd(
                        self.stream,
                        {"event": _payload(event), "type": event.type, "subject": event.subject, "id": event.id},
                        maxlen=self.maxlen, approximate=True,
                    )
                pipe.execute()
        except redis.RedisError as exc:
            raise DependencyUnavailable(f"Redis at {redact(self.url)} did not take the events: {redact(str(exc))}") from None

    def close(self) -> None:
        self._client.close()


# short name -> "module:Class", as Feast's table of online stores
SINKS: dict[str, str] = {
    "none": "app.events.sinks:NoSink",
    "kafka": "app.events.sinks:KafkaSink",
    "redis": "app.events.sinks:RedisSink",
}


def make_sink(settings) -> EventSink:
    """The sink ``settings.events.sink`` names."""
    path = SINKS.get(settings.events.sink)
    if path is None:
        raise InvalidInput(f"events.sink {settings.events.sink!r} is not one of {', '.join(sorted(SINKS))}")
    module, _, cls = path.partition(":")
    return getattr(importlib.import_module(module), cls)(settings)
