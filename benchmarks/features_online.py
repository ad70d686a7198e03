"""Feature store (issue 15): the online read path.

``bench_online_read``: one entity from 3 feature views x 10 float features on Redis (REDIS_URL,
default redis://127.0.0.1:6379/0), in one process: the platform's reader
(:class:`app.features.online.OnlineReader`, sync and async) vs Feast's own
``FeatureStore.get_online_features(...).to_dict()`` on the same store, interleaved in rounds
(the order rotating) after a warm-up. Reports p50 / p99 in microseconds and the ratios
platform / Feast (target <= 1.0x: at least as fast as the SDK it wraps). The definitions live in
a throwaway Feast project (a temporary MATIH_HOME, SQLite registry) whose Redis keys are
deleted after.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import tempfile
import time
import uuid
from typing import Any, Callable

TARGET_READ = 1.0  # platform p50 / Feast p50


def _percentiles(samples: list[float]) -> dict[str, float]:
    xs = sorted(samples)
    return {"p50_us": round(xs[len(xs) // 2] * 1e6, 1), "p99_us": round(xs[min(len(xs) - 1, int(len(xs) * 0.99))] * 1e6, 1),
            "mean_us": round(statistics.fmean(xs) * 1e6, 1), "n": len(xs)}


def _time(fn: Callable[[], Any], n: int) -> list[float]:
    out = []
    perf = time.perf_counter
    for _ in range(n):
        t = perf()
        fn()
        out.append(perf() - t)
    return out


def bench_online_read(rounds: int = 5, n: int = 2000, views: int = 3, features: int = 10,
                      redis_url: str | None = None) -> dict[str, Any]:
    """Platform reader vs Feast's get_online_features, 1 entity, ``views`` x ``features`` on Redis."""
    from datetime import datetime, timedelta, timezone

    import pandas as pd
    import redis
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64

    from app.features.online import OnlineReader
    from app.features.repo import open_store
    from app.settings import load_settings

    redis_url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    home = tempfile.mkdtemp(prefix="matih-bench-features-")
    settings = load_settings("local", matih_home=home, redis_url=redis_url)
    settings.features.project = "bench_" + uuid.uuid4().hex[:10]
    settings.features.online_store = "redis"
    settings.features.engine = "local"
    store = open_store(settings)
    customer = Entity(name="customer", join_keys=["customer_id"], value_type=ValueType.INT64)
    source = FileSource(path=f"{home}/unused.parquet", timestamp_field="ts")
    fvs = [FeatureView(name=f"v{v}", entities=[customer], ttl=timedelta(days=1), source=source, online=True,
                       schema=[Field(name="customer_id", dtype=Int64)]
                       + [Field(name=f"f{v}_{i}", dtype=Float64) for i in range(features)])
           for v in range(views)]
    store.apply([customer, *fvs, FeatureService(name="svc", features=fvs)])
    now = datetime.now(timezone.utc)
    for v, fv in enumerate(fvs):
        store.write_to_online_store(fv.name, pd.DataFrame(
            {"customer_id": list(range(100)), "ts": [now] * 100,
             **{f"f{v}_{i}": [float(i + j) for j in range(100)] for i in range(features)}}))

    service = store.get_feature_service("svc")
    reader = OnlineReader(store, "svc")
    rows = [{"customer_id": 7}]
    entities = {"customer_id": [7]}
    expected = store.get_online_features(features=service, entity_rows=rows).to_dict()
    got = reader.read(entities)
    assert all(got.values[k] == expected[k] for k in got.names), "the reader disagrees with Feast"

    loop = asyncio.new_event_loop()

    def platform_async() -> Any:
        return loop.run_until_complete(reader.read_async(entities))

    async def _feast_async() -> Any:
        return (await store.get_online_features_async(features=service, entity_rows=rows)).to_dict()

    candidates: dict[str, Callable[[], Any]] = {
        "feast": lambda: store.get_online_features(features=service, entity_rows=rows).to_dict(),
        "platform": lambda: reader.read(entities),
        "feast_async": lambda: loop.run_until_complete(_feast_async()),
        "platform_async": platform_async,
    }
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for fn in candidates.values():
        _time(fn, min(n, 300))  # warm-up: connections, registry cache, code paths
    names = list(candidates)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].extend(_time(candidates[name], n))
    loop.close()
    out: dict[str, Any] = {name: _percentiles(s) for name, s in samples.items()}
    out["ratios"] = {
        "sync_p50": round(out["platform"]["p50_us"] / out["feast"]["p50_us"], 3),
        "sync_p99": round(out["platform"]["p99_us"] / out["feast"]["p99_us"], 3),
        "async_p50": round(out["platform_async"]["p50_us"] / out["feast_async"]["p50_us"], 3),
        "async_p99": round(out["platform_async"]["p99_us"] / out["feast_async"]["p99_us"], 3),
        "target": TARGET_READ,
    }
    out["setup"] = {"views": views, "features_per_view": features, "entities": 1, "rounds": rounds, "n_per_round": n,
                    "redis": redis_url.rsplit("@", 1)[-1]}
    client = redis.Redis.from_url(redis_url)
    project = settings.features.project.encode()
    for key in client.scan_iter(count=1000):
        if key.endswith(project):
            client.delete(key)
    return out


if __name__ == "__main__":
    import json
    import sys

    print(json.dumps(bench_online_read(rounds=int(sys.argv[1]) if len(sys.argv) > 1 else 5), indent=2))
