"""The per-replica prediction-log buffer: bounded, never raising into the caller, shipping in
batches off the request path, keeping what a failed shipment held."""

from __future__ import annotations

import asyncio
import time

import pytest

from app.errors import DependencyUnavailable
from app.predlog.buffer import PredictionLogBuffer
from app.predlog.ids import new_request_id
from app.predlog.records import PredictionRecord


def record(endpoint: str = "iris") -> PredictionRecord:
    now = time.time()
    return PredictionRecord(new_request_id(now), now, endpoint, "", "iris", "1", 1.0,
                            inputs={"instances": [[1.0, 2.0]]}, outputs={"predictions": [0]})


class Sink:
    """A ship callable that keeps what it got; fails while ``down``."""

    def __init__(self) -> None:
        self.records: list[PredictionRecord] = []
        self.batches: list[list[PredictionRecord]] = []
        self.dropped: dict[str, int] = {}
        self.calls = 0
        self.down = False

    async def __call__(self, records, dropped) -> None:
        self.calls += 1
        if self.down:
            raise ConnectionError("sink down")
        self.records.extend(records)
        self.batches.append(records)
        for k, v in dropped.items():
            self.dropped[k] = self.dropped.get(k, 0) + v


def test_full_buffer_drops_and_counts_per_endpoint_without_a_loop():
    sink = Sink()
    buf = PredictionLogBuffer(sink, capacity=3)
    results = [buf.add(record("a")) for _ in range(3)] + [buf.add(record("a")), buf.add(record("b"))]
    assert results == [True, True, True, False, False]
    stats = buf.stats()
    assert stats["buffered"] == 3 and stats["dropped"] == 2
    assert stats["dropped_by_endpoint"] == {"a": 1, "b": 1}

    async def main():
        return await buf.flush()

    assert asyncio.run(main()) == 3
    assert len(sink.records) == 3 and sink.dropped == {"a": 1, "b": 1}  # drops reach the log with the records
    assert buf.stats()["buffered"] == 0


def test_background_task_ships_on_the_timer_and_at_once_when_a_batch_is_full():
    sink = Sink()

    async def main():
        buf = PredictionLogBuffer(sink, capacity=100, flush_interval_s=0.05, flush_max_records=10)
        for _ in range(5):
            assert buf.add(record())
        assert sink.calls == 0  # add never ships itself
        await asyncio.sleep(0.2)
        assert len(sink.records) == 5
        slow = PredictionLogBuffer(sink, capacity=100, flush_interval_s=30, flush_max_records=10)
        for _ in range(25):
            slow.add(record())
        await asyncio.sleep(0.1)  # full batches wake the shipper: no waiting for the 30 s timer
        assert len(sink.records) == 30 and slow.stats()["buffered"] == 0
        assert max(len(r) for r in sink.batches) == 10  # at most flush_max_records per shipment
        await slow.close()

    asyncio.run(main())


def test_failed_ship_keeps_records_as_far_as_capacity_allows_and_never_raises_into_add():
    sink = Sink()
    sink.down = True

    async def main():
        buf = PredictionLogBuffer(sink, capacity=6, flush_interval_s=0.02, flush_max_records=4)
        for _ in range(4):
            assert buf.add(record())
        await asyncio.sleep(0.1)  # shipments fail; the records stay
        assert buf.stats()["buffered"] == 4 and buf.stats()["ship_failures"] >= 1
        with pytest.raises(DependencyUnavailable, match="sink down"):
            await buf.flush()
        assert buf.stats()["buffered"] == 4
        # a batch of 4 out for shipping while 4 more arrive: on failure only 2 fit back
        gate = asyncio.Event()
        release = asyncio.Event()

        async def slow_fail(records, dropped):
            gate.set()
            await release.wait()
            raise ConnectionError("still down")

        buf._ship = slow_fail
        shipping = asyncio.create_task(buf.flush())
        await gate.wait()
        for _ in range(4):
            assert buf.add(record())  # 4 out, 4 buffered; capacity 6
        release.set()
        with pytest.raises(DependencyUnavailable):
            await shipping
        stats = buf.stats()
        assert stats["buffered"] == 6 and stats["dropped"] == 2
        sink.down = False
        buf._ship = sink
        assert await buf.flush() == 6
        assert len(sink.records) == 6 and sink.dropped == {"iris": 2}
        await buf.close()

    asyncio.run(main())


def test_add_never_raises_even_on_a_broken_record():
    buf = PredictionLogBuffer(Sink(), capacity=1)
    assert buf.add(record()) is True
    assert buf.add(None) is False  # full, and no endpoint to count it under: still no exception


def test_close_during_a_shipment_ships_nothing_twice():
    """A replica shutting down while a shipment is in flight: the shipment finishes, the rest
    goes once (found by the prediction-log benchmark: 10 records added, 20 received)."""
    import asyncio as _asyncio

    received = []

    async def slow_ship(records, dropped):
        received.extend(records)
        await _asyncio.sleep(0.2)

    async def main():
        buf = PredictionLogBuffer(slow_ship, capacity=100, flush_interval_s=0.01, flush_max_records=5)
        for i in range(10):
            buf.add(record())
        await _asyncio.sleep(0.05)  # the first shipment is in flight
        await buf.close()
        return buf.stats()

    stats = _asyncio.run(main())
    assert len(received) == 10 and len({r.request_id for r in received}) == 10
    assert stats["dropped"] == 0
