"""Materialization to the online store: Feast's Ray compute engine against Feast's local engine.

Generates ROWS rows (one per entity, ROWS distinct keys) x FEATURES float features as one parquet
file, defines an entity, a FileSource and a feature view with the Feast SDK, and materializes
the whole window into the Redis online store (REDIS_URL, default redis://127.0.0.1:6379/0),
once with the Ray compute engine (``batch_engine: ray.engine``, write_concurrency as the
platform sets it on Redis: 4) on a local Ray cluster (RAY_ADDRESS to use another) and once
with the local engine. Each engine writes under its own Feast project (fresh keys: nothing is
overwritten), then the project is torn down (its Redis keys deleted). The store is opened the
way the platform opens it (app.features.repo.open_store with the profile's settings), so the
Ray engine's configuration is the platform's. It prints seconds, rows/s and ratio Ray / local.

    .venv/bin/python benchmarks/features_materialize.py [--rows 1000000] [--features 10] [--keep]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pandas as pd


def _data(folder: Path, rows: int, features: int) -> Path:
    rng = np.random.default_rng(0)
    now = datetime.now(timezone.utc).replace(microsecond=0)
    frame = pd.DataFrame({f"f{i}": rng.random(rows) for i in range(features)})
    frame.insert(0, "entity_id", np.arange(rows, dtype=np.int64))
    frame["event_timestamp"] = pd.Timestamp(now - timedelta(hours=1)) - pd.to_timedelta(
        rng.integers(0, 3600, rows), unit="s")
    path = folder / "source.parquet"
    frame.to_parquet(path, index=False)
    return path


def _one(engine: str, home: Path, source: Path, features: int, redis_url: str, keep: bool) -> dict:
    from feast import Entity, FeatureView, Field, FileSource, ValueType
    from feast.types import Float64

    from app.features.repo import open_store
    from app.settings import load_settings

    project = f"bench_{engine}_{uuid.uuid4().hex[:8]}"
    settings = load_settings("local", matih_home=str(home), redis_url=redis_url,
                             ray_address=os.environ.get("RAY_ADDRESS") or None,
                             features={"online_store": "redis", "engine": engine, "project": project})
    store = open_store(settings, fresh=True)
    entity = Entity(name="entity", join_keys=["entity_id"], value_type=ValueType.INT64)
    src = FileSource(name="bench_src", path=str(source), timestamp_field="event_timestamp")
    view = FeatureView(name="bench", entities=[entity], ttl=timedelta(days=1), source=src,
                       schema=[Field(name=f"f{i}", dtype=Float64) for i in range(features)])
    store.apply([entity, src, view])
    end = datetime.now(timezone.utc)
    t0 = time.perf_counter()
    store.materialize(start_date=end - timedelta(hours=3), end_date=end, feature_views=["bench"])
    seconds = time.perf_counter() - t0
    check = store.get_online_features(features=["bench:f0"], entity_rows=[{"entity_id": 0}, {"entity_id": 1}])
    assert all(v is not None for v in check.to_dict()["f0"]), "materialized values missing"
    if not keep:
        store.teardown()
    return {"engine": engine, "project": project, "seconds": seconds}


def bench_materialize(rows: int = 1_000_000, features: int = 10, keep: bool = False,
                      redis_url: str | None = None) -> dict:
    """Materialize ``rows`` x ``features`` to Redis with each engine; returns the timings."""
    import ray

    redis_url = redis_url or os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS") or None, log_to_driver=False)
    with tempfile.TemporaryDirectory(prefix="matih-bench-fs-") as tmp:
        home = Path(tmp)
        (home / "data").mkdir()
        t0 = time.perf_counter()
        source = _data(home / "data", rows, features)
        print(f"{rows} rows x {features} features: parquet in {time.perf_counter() - t0:.1f}s "
              f"({source.stat().st_size / 1e6:.0f} MB); {ray.cluster_resources().get('CPU', 0):g} CPUs in Ray", flush=True)
        out = {"rows": rows, "features": features}
        for engine in ("ray", "local"):
            r = _one(engine, home, source, features, redis_url, keep)
            r["rows_per_s"] = rows / r["seconds"]
            out[engine] = r
            print(f"{engine:>5} engine: {r['seconds']:.1f}s, {r['rows_per_s']:,.0f} rows/s", flush=True)
        out["ratio_ray_over_local"] = out["ray"]["rows_per_s"] / out["local"]["rows_per_s"]
        print(f"ratio Ray / local: {out['ratio_ray_over_local']:.2f}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--keep", action="store_true", help="leave the Redis keys (default: tear the projects down)")
    args = parser.parse_args()
    bench_materialize(args.rows, args.features, args.keep)


if __name__ == "__main__":
    main()
