"""The relay: moves events from the outbox to the sink, oldest first, at least once.

One round (:meth:`EventRelay.run_once`) takes the next ``events.relay_batch`` unpublished
events in outbox order, publishes them as one batch and marks them published. When the sink
fails, the batch stays unpublished (each event's ``attempts`` and ``last_error`` say so) and
the relay waits before the next round, doubling the wait from ``_FIRST_RETRY_S`` up to
``events.retry_max_s``; no later event is sent before an earlier one got through, so the
order within every subject holds and nothing is skipped while the broker is down.

With the ``none`` sink nothing is published: events stay unpublished in the outbox, readable
through ``GET /v1/events``, until they are ``events.keep_published_days`` old and purged. Were
the sink switched to kafka or redis later, the relay would publish those still kept.

The actor ``actors/event_relay.py`` runs rounds in a loop; tests run them directly.
"""

from __future__ import annotations

import logging
import time
from datetime import datetime, timezone
from typing import Any

from app import metrics
from app.errors import MatihError
from app.events.outbox import Outbox
from app.events.sinks import EventSink, make_sink
from app.redaction import redact

log = logging.getLogger(__name__)

_FIRST_RETRY_S = 0.5
_PURGE_EVERY_S = 3600.0


class EventRelay:
    """Publishes the outbox of ``store`` to ``sink`` (default: the sink the settings name)."""

    def __init__(self, settings, store, sink: EventSink | None = None, *, clock=time.monotonic):
        self.settings = settings
        self.outbox = Outbox(store)
        self.sink = sink if sink is not None else make_sink(settings)
        self._clock = clock
        self._failures = 0
        self._retry_at = 0.0
        self._purged_at: float | None = None
        self.published_total = 0
        self.last_error: str | None = None
        self.last_published_at: str | None = None
        self.last_published_sequence: int | None = None

    @property
    def publishing(self) -> bool:
        return self.sink.name != "none"

    def backoff_s(self) -> float:
        """How long after the latest failure the next round may publish (0 after a success).
        Exponential, capped at ``events.retry_max_s`` (tenacity's wait_exponential is made for
        loops that block on one call; the relay's loop also wakes for new events, so the
        schedule is kept here)."""
        if not self._failures:
            return 0.0
        return min(self.settings.events.retry_max_s, _FIRST_RETRY_S * 2 ** (self._failures - 1))

    def seconds_until_due(self) -> float:
        """0 when a round may publish now; else how long the backoff still holds it back."""
        return max(0.0, self._retry_at - self._clock())

    def run_once(self) -> int:
        """One round: publish the next batch (unless backing off), then report the outbox
        depth; every hour also purge what is old. Returns how many events were published.
        Raises nothing for a sink that is down (that is recorded and retried later); a
        metadata store that is down raises DependencyUnavailable."""
        self._maybe_purge()
        published = 0
        if self.publishing and self.seconds_until_due() == 0:
            published = self._publish_batch()
        metrics.outbox_depth(self.outbox.depth())
        return published

    def drain(self, max_rounds: int = 1000) -> int:
        """Rounds until the outbox is empty or a round publishes nothing; returns the total."""
        total = 0
        for _ in range(max_rounds):
            n = self.run_once()
            total += n
            if n < self.settings.events.relay_batch:
                break
        return total

    def _publish_batch(self) -> int:
        batch = self.outbox.unpublished(self.settings.events.relay_batch)
        if not batch:
            return 0
        sequences = [e.sequence for e in batch]
        try:
            self.sink.publish(batch)
        except MatihError as exc:
            self._failed(sequences, exc.message)
            return 0
        except Exception as exc:  # a sink's unexpected error is retried like an outage, never skipped
            log.exception("event sink %s raised", self.sink.name)
            self._failed(sequences, f"{type(exc).__name__}: {exc}")
            return 0
        self.outbox.mark_published(sequences)
        self._failures, self._retry_at = 0, 0.0
        self.last_error = None
        self.published_total += len(batch)
        self.last_published_at = datetime.now(timezone.utc).isoformat()
        self.last_published_sequence = sequences[-1]
        metrics.events_published(self.sink.name, len(batch))
        return len(batch)

    def _failed(self, sequences: list[int], error: str) -> None:
        error = redact(error)
        self._failures += 1
        self._retry_at = self._clock() + self.backoff_s()
        self.last_error = error
        log.warning("publishing %d event(s) to %s failed (attempt %d, next in %.1fs): %s",
                    len(sequences), self.sink.name, self._failures, self.backoff_s(), error)
        self.outbox.record_failure(sequences, error)

    def _maybe_purge(self) -> None:
        now = self._clock()
        if self._purged_at is not None and now - self._purged_at < _PURGE_EVERY_S:
            return
        self._purged_at = now
        removed = self.outbox.purge(self.settings.events.keep_published_days, unpublished_too=not self.publishing)
        if removed:
            log.info("purged %d event(s) older than %d days from the outbox", removed,
                     self.settings.events.keep_published_days)

    def status(self) -> dict[str, Any]:
        """What ``EventRelay.status()`` of the actor reports."""
        return {
            "sink": self.sink.name,
            "depth": self.outbox.depth(),
            "published_total": self.published_total,
            "last_published_at": self.last_published_at,
            "last_published_sequence": self.last_published_sequence,
            "last_error": self.last_error,
            "consecutive_failures": self._failures,
            "retry_in_s": round(self.seconds_until_due(), 3),
        }

    def close(self) -> None:
        self.sink.close()
