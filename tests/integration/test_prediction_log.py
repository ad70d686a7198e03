"""The PredictionLog actor on the session's Ray cluster (its files on the session's S3
server): a replica buffer ships to it through ActorPredictionLog, the records come back through
``app.predlog.read`` (Ray Data), erasure rewrites the files, and a restarted actor keeps them."""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime, timedelta, timezone


import app.predlog
from actors.prediction_log import get_prediction_log
from app.predlog.buffer import PredictionLogBuffer
from app.predlog.control import ActorPredictionLog
from app.predlog.ids import new_request_id
from app.predlog.records import PredictionRecord
from tests.support import kill_and_time, wait_until


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

    kill_and_time("prediction_log", lambda _: True, timeout=120)  # a new incarnation of the actor is up
    after = wait_until(lambda: _stats_or_none(log, endpoint), timeout=120)
    assert after["received"] == 0 and after["files"] == stats["files"]  # counters restart; files stay


def _stats_or_none(log, endpoint):
    try:
        return asyncio.run(log.stats(endpoint))
    except Exception:
        return None


def test_every_prediction_over_http_is_logged_once(platform, iris):
    """5,000 predictions through the real ingress, 8 clients at once (REST and V2): 5,000
    records, one per server-issued request id, none dropped; readable page by page over HTTP
    and with Ray Data; feedback for them joins by request id."""
    from concurrent.futures import ThreadPoolExecutor

    from app.predlog.feedback import FeedbackStore
    from app.predlog.join import labeled
    from app.store import MetadataStore

    endpoint = f"logged-{uuid.uuid4().hex[:6]}"
    with platform.client() as c:
        assert c.post("/v1/endpoints", json={"name": endpoint, "target": "iris@champion"}).status_code == 201
    since = datetime.now(timezone.utc) - timedelta(minutes=1)
    row = [5.1, 3.5, 1.4, 0.2]
    v2 = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": row}]}

    def client_run(k: int) -> list[str]:
        ids = []
        with platform.client() as c:
            for i in range(625):
                if i % 5 == 0:
                    r = c.post(f"/v2/models/{endpoint}/infer", json=v2)
                    assert r.status_code == 200, r.text
                    ids.append(r.json()["parameters"]["request_id"])
                else:
                    r = c.post(f"/v1/endpoints/{endpoint}/predict", json={"instances": [row]})
                    assert r.status_code == 200, r.text
                    ids.append(r.json()["request_id"])
        return ids

    with ThreadPoolExecutor(8) as pool:
        sent = [rid for ids in pool.map(client_run, range(8)) for rid in ids]
    assert len(sent) == len(set(sent)) == 5000

    with platform.client() as c:
        stats = wait_until(lambda: (s := c.get(f"/v1/endpoints/{endpoint}/log/stats").json())["written"] >= 5000 and s,
                           timeout=60)
        assert stats["written"] == 5000 and stats["dropped"] == 0, stats
        logged, token = [], None
        while True:
            params = {"limit": 1000, "since": since.isoformat(), **({"page_token": token} if token else {})}
            page = c.get(f"/v1/endpoints/{endpoint}/predictions", params=params).json()
            logged += page["items"]
            token = page["next_page_token"]
            if not token:
                break
        assert len(logged) == 5000 and {i["request_id"] for i in logged} == set(sent)
        assert {i["protocol"] for i in logged} == {"rest", "v2"} and {i["caller"] for i in logged} == {"admin"}
        assert all(i["model_version"] and i["latency_ms"] > 0 for i in logged)

        fb = c.post(f"/v1/endpoints/{endpoint}/feedback", json=[{"request_id": rid, "label": 0} for rid in sent[:100]])
        assert fb.status_code == 200 and fb.json()["accepted"] == 100, fb.text

    until = datetime.now(timezone.utc) + timedelta(minutes=1)
    assert app.predlog.read(endpoint, since, until, settings=platform.settings).count() == 5000
    store = MetadataStore(platform.settings.database_url)
    try:
        joined = labeled(platform.settings, FeedbackStore(store), endpoint, since, until)
        assert joined.num_rows == 100 and set(joined.column("request_id").to_pylist()) == set(sent[:100])
    finally:
        store.dispose()
