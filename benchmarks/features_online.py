"""Feature store (issue 15): the online read path.

``bench_online_read``: one entity from 3 feature views x 10 float features on Redis (REDIS_URL,
default redis://127.0.0.1:6379/0), in one process: the platform's reader
(:class:`app.features.online.OnlineReader`, sync and async) vs Feast's own
``FeatureStore.get_online_features(...).to_dict()`` on the same store, interleaved in rounds
(the order rotating) after a warm-up. Reports p50 / p99 in microseconds and the ratios
platform / Feast (target <= 1.0x: at least as fast as the SDK it wraps). The definitions live in
a throwaway Feast project (a temporary MATIH_HOME, SQLite registry) whose Redis keys are
deleted after.

``bench_enriched_endpoint``: the platform served as benchmarks/ensembles.py serves it (a local
Ray cluster, ``deployments.app.build``; the online store on Redis under a throwaway project),
a LinearRegression over the 30 stored features and one request-time feature (``extra``)
uploaded once (skops) and served by two endpoints: ``fe-enriched`` (spec.features: service
``svc``, entity key customer_id) sent ``{"customer_id", "extra"}``, and ``fe-plain`` sent all 31
features. p50 at concurrency 1 and 8, interleaved rounds (benchmarks/ensembles.py's
``measure``: wrk when installed, else its httpx driver); ratio enriched / plain (target <= 1.3x).
It uses the whole machine: run it alone.
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
TARGET_ENRICHED = 1.3  # enriched endpoint p50 / the same model with the features in the request


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


def _define(store, home: str, views: int, features: int, ids: int = 100) -> list[str]:
    """Entity customer, views v0.. of ``features`` floats each, service svc; values for ``ids``
    customers written now. Returns the feature names."""
    from datetime import datetime, timedelta, timezone

    import pandas as pd
    from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64, Int64

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
            {"customer_id": list(range(ids)), "ts": [now] * ids,
             **{f"f{v}_{i}": [float(i + j) for j in range(ids)] for i in range(features)}}))
    return [f"f{v}_{i}" for v in range(views) for i in range(features)]


def _drop_keys(redis_url: str, project: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)
    suffix = project.encode()
    for key in client.scan_iter(count=1000):
        if key.endswith(suffix):
            client.delete(key)


def bench_online_read(rounds: int = 5, n: int = 2000, views: int = 3, features: int = 10,
                      redis_url: str | None = None) -> dict[str, Any]:
    """Platform reader vs Feast's get_online_features, 1 entity, ``views`` x ``features`` on Redis."""
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
    _define(store, home, views, features)

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

    # The floor: the same HMGET (Feast's key, every view's fields) through redis.asyncio's own
    # pipeline, nothing decoded: what any read of these features from this process must wait for.
    from redis import asyncio as redis_asyncio

    bare = redis_asyncio.Redis.from_url(redis_url)
    _, (command,) = reader._redis_commands(reader.resolve(), entities)
    key = command.split(b"\r\n")[4]
    fields = [f for view in reader.resolve().views for f in view.fields]

    async def _bare_async() -> Any:
        async with bare.pipeline(transaction=False) as pipe:
            pipe.hmget(key, fields)
            return await pipe.execute()

    candidates: dict[str, Callable[[], Any]] = {
        "feast": lambda: store.get_online_features(features=service, entity_rows=rows).to_dict(),
        "platform": lambda: reader.read(entities),
        "feast_async": lambda: loop.run_until_complete(_feast_async()),
        "platform_async": platform_async,
        "redis_bare_async": lambda: loop.run_until_complete(_bare_async()),
    }
    samples: dict[str, list[float]] = {k: [] for k in candidates}
    for fn in candidates.values():
        _time(fn, min(n, 300))  # warm-up: connections, registry cache, code paths
    names = list(candidates)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            samples[name].extend(_time(candidates[name], n))
    loop.run_until_complete(bare.aclose())
    loop.close()
    out: dict[str, Any] = {name: _percentiles(s) for name, s in samples.items()}
    out["ratios"] = {
        "sync_p50": round(out["platform"]["p50_us"] / out["feast"]["p50_us"], 3),
        "sync_p99": round(out["platform"]["p99_us"] / out["feast"]["p99_us"], 3),
        "async_p50": round(out["platform_async"]["p50_us"] / out["feast_async"]["p50_us"], 3),
        "async_p99": round(out["platform_async"]["p99_us"] / out["feast_async"]["p99_us"], 3),
        "target": TARGET_READ,
        "floor_async_p50": round(out["redis_bare_async"]["p50_us"] / out["feast_async"]["p50_us"], 3),
    }
    out["setup"] = {"views": views, "features_per_view": features, "entities": 1, "rounds": rounds, "n_per_round": n,
                    "redis": redis_url.rsplit("@", 1)[-1]}
    _drop_keys(redis_url, settings.features.project)
    return out


def bench_enriched_endpoint(rounds: int = 3, duration: float = 10.0, warmup: float = 3.0,
                            levels: tuple[int, ...] = (1, 8), ingress: str = "haproxy",
                            redis_url: str | None = None) -> dict[str, Any]:
    """An enriched endpoint vs the same model with the features in the request (see the module docstring)."""
    import types

    import numpy as np
    import pandas as pd
    import skops.io
    from sklearn.linear_model import LinearRegression

    from benchmarks import ensembles as ens
    from benchmarks import peer_serving as ps

    redis_url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    project = "bench_" + uuid.uuid4().hex[:10]
    features_section = {"online_store": "redis", "project": project, "engine": "local"}
    base_overrides = ens.platform_overrides

    def overrides(home: str, ingress_mode: str) -> dict[str, Any]:  # the platform's settings, features on Redis
        return {**base_overrides(home, ingress_mode), "redis_url": redis_url, "features": features_section}

    ens.platform_overrides = overrides
    args = types.SimpleNamespace(ingress=ingress, rounds=rounds, duration=duration, warmup=warmup)
    try:
        with ens.served_platform(args, "matih-features") as (base, token, _est, _env, workdir):
            import httpx

            from app.features.repo import open_store
            from app.settings import load_settings

            home = os.environ["MATIH_HOME"]
            settings = load_settings("local", **overrides(home, ingress))
            names = _define(open_store(settings), home, 3, 10)
            rng = np.random.default_rng(0)
            X = pd.DataFrame(rng.normal(size=(200, len(names) + 1)), columns=[*names, "extra"])
            est = LinearRegression().fit(X, X.sum(axis=1))
            headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
                r = c.post("/v1/models/fe-m/versions", files={"file": ("m.skops", skops.io.dumps(est))},
                           data={"format": "skops"})
                r.raise_for_status()
                target = f"fe-m/{r.json()['version']}"
                for name, spec in (("fe-plain", {}), ("fe-enriched", {"features": {
                        "service": "svc", "entity_keys": ["customer_id"], "max_age_s": 86400}})):
                    c.post("/v1/endpoints", json={"name": name, "target": target, "spec": spec}).raise_for_status()
                row = {n: float(i + 7) for n, i in ((f"f{v}_{i}", i) for v in range(3) for i in range(10))}
                bodies = {"plain": {"instances": [{**row, "extra": 0.5}]},
                          "enriched": {"instances": [{"customer_id": 7, "extra": 0.5}]}}
                urls = {"plain": f"{base}/v1/endpoints/fe-plain/predict",
                        "enriched": f"{base}/v1/endpoints/fe-enriched/predict"}
                answers = {k: c.post(urls[k], json=bodies[k]).json() for k in urls}
                assert abs(answers["plain"]["predictions"][0] - answers["enriched"]["predictions"][0]) < 1e-3, answers
            keys = list(urls)
            for key in keys:
                ens.measure(urls[key], bodies[key], headers, 8, warmup, workdir)
            runs: dict[tuple[str, int], list[Any]] = {(k, c): [] for k in keys for c in levels}
            for rnd in range(rounds):
                order = keys[rnd % 2:] + keys[:rnd % 2]
                for c in levels:
                    for key in order:
                        res = ens.measure(urls[key], bodies[key], headers, c, duration, workdir)
                        if res.errors:
                            raise RuntimeError(f"{key} c={c} round {rnd + 1}: {res.errors} errors")
                        runs[(key, c)].append(res)
                        print(f"  round {rnd + 1} c={c:<2} {key:<9} p50 {res.p50_ms:7.2f} ms  p99 {res.p99_ms:7.2f} ms  "
                              f"{res.rps:7.0f} req/s", flush=True)
    finally:
        ens.platform_overrides = base_overrides
        _drop_keys(redis_url, project)
    out: dict[str, Any] = {k: {f"c{c}": ens.summarize(runs[(k, c)]) for c in levels} for k in keys}
    out["ratios"] = {f"c{c}": {"p50_ratio": round(out["enriched"][f"c{c}"]["p50_ms"] / out["plain"][f"c{c}"]["p50_ms"], 3),
                               "target": TARGET_ENRICHED} for c in levels}
    out["driver"] = "wrk" if ps.WRK else "httpx (asyncio, this process)"
    return out


if __name__ == "__main__":
    import json
    import sys

    which = sys.argv[1] if len(sys.argv) > 1 else "read"
    if which == "read":
        print(json.dumps(bench_online_read(), indent=2))
    else:
        print(json.dumps(bench_enriched_endpoint(rounds=int(sys.argv[2]) if len(sys.argv) > 2 else 3,
                                                 duration=float(sys.argv[3]) if len(sys.argv) > 3 else 10.0), indent=2))
