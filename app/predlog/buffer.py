"""The per-replica buffer between the serving path and the prediction log.

Logging must never block or fail a prediction: :meth:`PredictionLogBuffer.add` only appends to
a bounded in-memory queue (or counts a drop when it is full), and a background task of the
replica's event loop ships batches through an injected ``ship(records, dropped)`` coroutine
(the PredictionLog actor in the Gateway, an in-process service in tests:
``app.predlog.control``). A failed shipment keeps its records for the next try, as far as the
buffer's capacity allows; the rest count as dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable
from typing import Any

from app import metrics
from app.errors import DependencyUnavailable
from app.predlog.records import PredictionRecord

log = logging.getLogger(__name__)

# ship(records, dropped): send ``records`` and the drops counted since the last successful
# shipment ({endpoint: count}); raising means nothing was taken.
Ship = Callable[[list[PredictionRecord], dict[str, int]], Awaitable[Any]]

_LOG_EVERY_S = 60.0  # a failing sink is logged at most this often


class PredictionLogBuffer:
    """Records of one Gateway replica waiting to be shipped, at most ``capacity`` of them.

    ``add`` is synchronous, O(1), never raises and never waits. Shipping runs in a task of the
    event loop that first calls ``add`` (or ``start``): every ``flush_interval_s``, or at once
    when ``flush_max_records`` are waiting. ``flush()`` ships everything now (shutdown, tests).
    """

    def __init__(
        self, ship: Ship, *, capacity: int = 50_000, flush_interval_s: float = 0.5, flush_max_records: int = 5_000
    ):
        self._ship = ship
        self.capacity = capacity
        self.flush_interval_s = flush_interval_s
        self.flush_max_records = flush_max_records
        self._queue: deque[PredictionRecord] = deque()
        self._dropped_unreported: Counter[str] = Counter()  # sent with the next successful shipment
        self._dropped: Counter[str] = Counter()  # since this replica started
        self._added = 0
        self._shipped = 0
        self._ship_failures = 0
        self._last_ship: float | None = None
        self._last_error: str | None = None
        self._last_logged = 0.0
        self._task: asyncio.Task | None = None
        self._wake: asyncio.Event | None = None
        self._lock: asyncio.Lock | None = None
        self._closed = False

    @classmethod
    def from_settings(cls, settings, ship: Ship) -> PredictionLogBuffer:
        s = settings.predlog
        return cls(ship, capacity=s.buffer_records, flush_interval_s=s.flush_interval_s,
                   flush_max_records=s.flush_max_records)

    # -- the request path ---------------------------------------------------------------------
    def add(self, record: PredictionRecord) -> bool:
        """Queue ``record``; False when the buffer is full (the record is dropped and counted)."""
        try:
            if len(self._queue) >= self.capacity:
                self._drop(record.endpoint, 1)
                return False
            self._queue.append(record)
            self._added += 1
            task = self._task
            if task is None or task.done():
                self.start()
            elif len(self._queue) >= self.flush_max_records and self._wake is not None:
                self._wake.set()
            return True
        except Exception:  # never into the prediction
            log.exception("prediction log buffer: add failed")
            return False

    def _drop(self, endpoint: str, count: int) -> None:
        self._dropped[endpoint] += count
        self._dropped_unreported[endpoint] += count
        try:
            metrics.predlog_dropped(endpoint, count)
        except Exception:
            pass

    # -- shipping ----------------------------------------------------------------------------
    def start(self) -> bool:
        """Start the shipping task in the running event loop; False when there is none (then
        the first ``add`` inside a loop starts it)."""
        if self._closed:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if self._task is not None and not self._task.done() and self._task.get_loop() is loop:
            return True
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task = loop.create_task(self._run(), name="prediction-log-ship")
        return True

    async def _run(self) -> None:
        assert self._wake is not None
        while True:
            try:  # asyncio.timeout, not wait_for: wait_for of 3.11 can swallow a cancellation
                async with asyncio.timeout(self.flush_interval_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            while self._queue or self._dropped_unreported:
                full = len(self._queue) >= self.flush_max_records
                if await self._ship_one() is None:
                    break  # failed: wait for the next tick
                if not full:
                    break

    async def _ship_one(self) -> int | None:
        """Ship one batch (or only the drop counts): how many records it took; None on failure."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            n = min(len(self._queue), self.flush_max_records)
            if n == 0 and not self._dropped_unreported:
                return 0
            batch = [self._queue.popleft() for _ in range(n)]
            dropped = dict(self._dropped_unreported)
            self._dropped_unreported.clear()
            try:
                await self._ship(batch, dropped)
            except asyncio.CancelledError:
                self._put_back(batch, dropped)
                raise
            except Exception as exc:
                self._ship_failures += 1
                self._last_error = f"{type(exc).__name__}: {exc}"[:500]
                self._put_back(batch, dropped)
                now = time.monotonic()
                if now - self._last_logged >= _LOG_EVERY_S:
                    self._last_logged = now
                    log.warning("prediction log: shipping %d records failed (%s); keeping them for the next try",
                                n, self._last_error)
                return None
            self._shipped += n
            self._last_ship = time.time()
            return n

    def _put_back(self, batch: list[PredictionRecord], dropped: dict[str, int]) -> None:
        """A failed batch goes back to the front (it is the oldest), as far as there is room."""
        self._dropped_unreported.update(dropped)
        room = max(0, self.capacity - len(self._queue))
        keep, lost = batch[:room], batch[room:]
        self._queue.extendleft(reversed(keep))
        if lost:
            for endpoint, count in Counter(r.endpoint for r in lost).items():
                self._drop(endpoint, count)

    async def flush(self) -> int:
        """Ship every buffered record now; the number shipped. Raises what ``ship`` raised
        (the records stay buffered), so shutdown and tests see a failure."""
        shipped = 0
        while True:
            # Under the shipping lock: a shipment the background task has in flight ends first, so
            # records it took (and puts back on failure) are not missed by an empty-looking queue.
            n = await self._ship_one()
            if n is None:
                raise DependencyUnavailable(f"shipping the prediction log failed ({self._last_error}); the records stay buffered")
            if n == 0:
                return shipped
            shipped += n

    async def close(self) -> int:
        """Stop the shipping task and ship what is left (the replica is shutting down)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None and not task.done():
            # Under the lock: a shipment in flight finishes first (cancelling it would put back
            # records the actor may have taken already, and they would go twice).
            if self._lock is None:
                self._lock = asyncio.Lock()
            async with self._lock:
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass
        return await self.flush()

    def stats(self) -> dict[str, Any]:
        """This replica's counters since it started."""
        return {
            "buffered": len(self._queue),
            "capacity": self.capacity,
            "added": self._added,
            "shipped": self._shipped,
            "dropped": sum(self._dropped.values()),
            "dropped_by_endpoint": dict(self._dropped),
            "ship_failures": self._ship_failures,
            "last_ship": self._last_ship,
            "last_error": self._last_error,
        }
