"""Feature store (issue 15, part 5): the four measurements, each side by side in one run.

  online       one entity from 3 feature views x 10 features on Redis, in one process: the
               platform's read path (app.features.online.OnlineReader, sync and async) vs
               Feast's own get_online_features on the same store; p50 and p99
               (benchmarks/features_online.py:bench_online_read; target <= 1.0x)
  enriched     an endpoint with spec.features (requests carry the entity key and one
               request-time feature) vs the same model with all 31 features in the request, on
               the served platform; p50 at concurrency 1 and 8
               (benchmarks/features_online.py:bench_enriched_endpoint; target <= 1.3x)
  materialize  ROWS x 10 features from parquet to the Redis online store: Feast's Ray compute
               engine vs Feast's local engine, rows/s and ratio
               (benchmarks/features_materialize.py:bench_materialize)
  streams      rows/s through the StreamIngestor's core from a Kafka topic (Tansu) to the
               Redis online store, and the p99 freshness, event time to readable online
               (benchmarks/features_streams.py:bench_streams)

Redis: REDIS_URL (default redis://127.0.0.1:6379/0); every part writes under a throwaway Feast
project and deletes its keys after. Ratios are printed, never asserted.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/features.py [--part online|enriched|materialize|streams|all]
        [--rows 1000000] [--rounds 3] [--duration 10] [--json PATH]

`enriched` and `materialize` start a local Ray cluster and use the whole machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PARTS = ("online", "enriched", "materialize", "streams")


def run(part: str, args) -> dict[str, Any]:
    if part == "online":
        from benchmarks.features_online import bench_online_read

        out = bench_online_read(rounds=5, n=2000)
        r = out["ratios"]
        print(f"online read, platform / Feast: sync p50 {r['sync_p50']:.2f}x p99 {r['sync_p99']:.2f}x; "
              f"async p50 {r['async_p50']:.2f}x p99 {r['async_p99']:.2f}x (target <= 1.0x)", flush=True)
        print(f"  the floor, a bare redis.asyncio pipeline of the same HMGET (nothing decoded) / Feast async p50: "
              f"{r['floor_async_p50']:.2f}x", flush=True)
        for name in ("platform", "feast", "platform_async", "feast_async", "redis_bare_async"):
            print(f"  {name:<15} p50 {out[name]['p50_us']:8.0f} us  p99 {out[name]['p99_us']:8.0f} us", flush=True)
        return out
    if part == "enriched":
        from benchmarks.features_online import bench_enriched_endpoint

        out = bench_enriched_endpoint(rounds=args.rounds, duration=args.duration)
        for level, r in out["ratios"].items():
            print(f"enriched / plain p50 at {level}: {r['p50_ratio']:.2f}x (target <= 1.3x; "
                  f"{out['enriched'][level]['p50_ms']:.2f} vs {out['plain'][level]['p50_ms']:.2f} ms, "
                  f"driver {out['driver']})", flush=True)
        return out
    if part == "materialize":
        from benchmarks.features_materialize import bench_materialize

        return bench_materialize(rows=args.rows, features=10)
    from benchmarks.features_streams import bench_streams

    out = bench_streams()
    print(f"streams: {out['rows_per_s']:,} rows/s ({out['rows']} rows, {out['partitions']} partitions, "
          f"batches of {out['batch_rows']}); freshness at {out['fresh_rate']:.0f} rows/s: "
          f"p50 {out['freshness_p50_s']:.3f} s, p99 {out['freshness_p99_s']:.3f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=(*PARTS, "all"), default="all")
    p.add_argument("--rows", type=int, default=1_000_000, help="materialize: rows (default 1,000,000)")
    p.add_argument("--rounds", type=int, default=3, help="enriched: interleaved rounds (default 3)")
    p.add_argument("--duration", type=float, default=10.0, help="enriched: seconds per target and level (default 10)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    args = p.parse_args(argv)
    parts = PARTS if args.part == "all" else (args.part,)
    results = {}
    for part in parts:
        print(f"== {part}", flush=True)
        results[part] = run(part, args)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
