"""The PredictionLog actor on the session's Ray cluster (its files on the session's S3
server): a replica buffer ships to it through ActorPredictionLog, the records come back through
``app.predlog.read`` (Ray Data), erasure rewrites the files, and a restarted actor keeps them."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone

import ray

import app.predlog
from actors.prediction_log import get_prediction_log
from app.predlog.buffer import PredictionLogBuffer
from app.predlog.control import ActorPredictionLog
from app.predlog.ids import new_request_id
from app.predlog.records import PredictionRecord
from tests.support import wait_until


def _record(endpoint: str, caller: str) -> PredictionRecord:
    now = time.time()
    return PredictionRecord(new_request_id(now), now, endpoint, "", "iris", "1", 1.0,
                            inputs={"instances": [[5.1, 3.5, 1.4, 0.2], [6.0, 2.9, 4.5, 1.5]]},
                            feature_names=["a", "b", "c", "d"], outputs={"predictions": [0, 1]}, caller=caller)


def test_actor_writes_what_replicas_ship_and_ray_data_reads_it(platform):
    settings = platform.settings
    log = ActorPredictionLog(get_prediction_log(settings.shared_kwargs(), settings), timeout_s=60)
    endpoint = f"predlog-it-{uuid.uuid4().hex[:8]}"
    since = datetime.now(timezone.utc) - timedelta(minutes=1)

    async def ship() -> None:
        buffer = PredictionLogBuffer.from_settings(settings, log.write)
        for i in range(300):
            assert buffer.add(_record(endpoint, "erin" if i % 3 == 0 else "frank"))
        await buffer.close()

    asyncio.run(ship())
    asyncio.run(log.flush())
    stats = asyncio.run(log.stats(endpoint))
    assert stats["received"] == 300 and stats["written"] == 300 and stats["files"] >= 1

    until = datetime.now(timezone.utc) + timedelta(minutes=1)
    ds = app.predlog.read(endpoint, since, until, settings=settings)
    assert ds.count() == 600  # two rows per request
    assert app.predlog.read(endpoint, until, until + timedelta(hours=1), settings=settings).count() == 0

    removed = asyncio.run(log.erase(endpoint, caller="erin"))
    assert removed["records_removed"] == 200
    assert app.predlog.read(endpoint, since, until, settings=settings).count() == 400

    ray.kill(ray.get_actor("prediction_log", namespace="matih"), no_restart=False)
    after = wait_until(lambda: _stats_or_none(log, endpoint), timeout=120)
    assert after["received"] == 0 and after["files"] == stats["files"]  # counters restart; files stay


def _stats_or_none(log, endpoint):
    try:
        return asyncio.run(log.stats(endpoint))
    except Exception:
        return None
