"""Traffic experiments (issue 14, part 4): what a traffic plan costs on the request path, and how
long the sequential analysis of a large log takes.

The platform is started as benchmarks/ensembles.py starts it (benchmarks/peer_serving.py's
helpers): a local Ray cluster, ``serve.run`` of ``deployments.app.build``, the iris
LogisticRegression (scikit-learn's bundled data, seed 0) uploaded as a skops file and converted
to ONNX (endpoint ``iris``); the same estimator is uploaded again as ``iris-b``, so both
variants of the split cost the same and any difference is the plan's.

Targets (REST ``/v1/endpoints/{name}/predict``, one single-row request per call, keep-alive):

  single   endpoint iris: no traffic plan
  split    endpoint iris-split: variants a (iris) 50 / b (iris-b) 50, strategy fixed
  shadow   endpoint iris-shadow: iris, with iris-b as a shadow at sample 1.0 (every request
           copied; the copy runs off the request path, in the same Gateway replica)

Each target runs at concurrency 1 and 8 in interleaved rounds (the order rotating), with wrk
when installed, else an asyncio httpx client (printed). Ratios (printed, never asserted):
split / single p50 at c=1 and c=8 (target <= 1.15x) and throughput; shadow / single p50 at c=8
(target <= 1.1x).

``--part msprt`` (no platform): 1M logged binary outcomes in two arms as a pyarrow table (the
shape the analysis reads from the log joined with feedback), the per-arm aggregation, one mSPRT
look and the always-valid path at 100 looks: seconds, printed.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/traffic.py [--part serving|msprt|all]
        [--duration 10] [--rounds 3] [--json PATH]

It uses the whole machine: run it alone. Interrupting it shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import peer_serving as ps
from benchmarks.ensembles import print_ratios, run_rounds, served_platform
from benchmarks.peer_serving import ROW, commit, machine_info

LEVELS = (1, 8)
TARGETS = ("single", "split", "shadow")
TARGET_SPLIT = 1.15  # split p50 / single p50
TARGET_SHADOW = 1.1  # shadow p50 / single p50 at c=8


def create_targets(base: str, token: str, est) -> dict[str, str]:
    import httpx
    import skops.io

    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        a = c.get("/v1/endpoints/iris").json()["model_version"]
        r = c.post("/v1/models/iris-b/versions", files={"file": ("iris.skops", skops.io.dumps(est))},
                   data={"format": "skops"})
        r.raise_for_status()
        b = r.json()["version"]
        plans = {
            "iris-split": {"variants": [{"name": "a", "target": f"iris/{a}", "weight": 50},
                                        {"name": "b", "target": f"iris-b/{b}", "weight": 50}]},
            "iris-shadow": {"variants": [{"name": "a", "target": f"iris/{a}", "weight": 100}],
                            "shadows": [{"target": f"iris-b/{b}", "sample": 1.0}]},
        }
        for name, traffic in plans.items():
            r = c.post("/v1/endpoints", json={"name": name, "target": f"iris/{a}", "spec": {"traffic": traffic}})
            if r.status_code != 201:
                raise RuntimeError(f"endpoint {name}: {r.status_code} {r.text[:500]}")
        urls = {"single": f"{base}/v1/endpoints/iris/predict"}
        for key, name in (("split", "iris-split"), ("shadow", "iris-shadow")):
            seen = set()
            for _ in range(60):  # the first calls load each variant's model
                r = c.post(f"/v1/endpoints/{name}/predict", json={"instances": [ROW]})
                if r.status_code == 200:
                    seen.add(r.json().get("variant"))
                    if key == "shadow" or len(seen) == 2:
                        break
                time.sleep(0.2)
            if r.status_code != 200:
                raise RuntimeError(f"{key}: {r.status_code} {r.text[:300]}")
            urls[key] = f"{base}/v1/endpoints/{name}/predict"
    print(f"models iris/{a}, iris-b/{b}; targets {', '.join(urls)}", flush=True)
    return urls


def shadow_counts(base: str, token: str) -> dict[str, Any]:
    """How many of iris-shadow's logged requests the shadow answered (its log against the
    primary's, from the shadow report once the log has caught up): the shadow really ran."""
    import httpx

    time.sleep(6)  # the prediction log writes every few seconds
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=300) as c:
        doc = c.get("/v1/endpoints/iris-shadow/shadow/report").json()
    sh = next(iter(doc.get("shadows", {}).values()), {})
    out = {"primary_logged": doc.get("primary", {}).get("n"), "shadow_logged": sh.get("n_shadow"),
           "agreement": sh.get("agreement"), "shadow_error_rate": (sh.get("error_rate") or {}).get("shadow")}
    print(f"shadow log: {out['shadow_logged']} shadow answers for {out['primary_logged']} logged primary requests "
          f"(agreement {out['agreement']}, shadow error rate {out['shadow_error_rate']}); the rest were dropped "
          "at serving.shadow_max_in_flight", flush=True)
    return out


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    pairs = [("split_vs_single", "split", c, TARGET_SPLIT) for c in LEVELS]
    pairs.append(("shadow_vs_single", "shadow", 8, TARGET_SHADOW))
    for name, key, c, target in pairs:
        if key not in results or "single" not in results:
            continue
        ra, rb = results[key][f"c{c}"], results["single"][f"c{c}"]
        ratio = ra["p50_ms"] / rb["p50_ms"]
        out[f"{name}_c{c}"] = {"p50_ratio": ratio, "target": target, "met": ratio <= target,
                               "rps_ratio": ra["rps"] / rb["rps"] if rb["rps"] else float("nan")}
    return out


def serving(args) -> dict[str, Any]:
    with served_platform(args, "matih-traffic") as (base, token, est, env, workdir):
        urls = create_targets(base, token, est)
        keys = [k for k in TARGETS if k in urls and (not args.targets or k in args.targets.split(","))]
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        results = run_rounds(urls, keys, LEVELS, args, headers, {"instances": [ROW]}, workdir)
        rat = ratios(results)
        shadowed = shadow_counts(base, token) if "shadow" in keys else None
        print_ratios(rat)
        return {"config": {"ingress": args.ingress, "cluster_env": env, "duration_s": args.duration,
                           "rounds": args.rounds, "levels": list(LEVELS), "driver": ps.WRK or "httpx"},
                "results": results, "ratios": rat, "shadow_log": shadowed}


def msprt_bench(n: int = 1_000_000, looks: int = 100) -> dict[str, Any]:
    """The mSPRT analysis of ``n`` logged binary outcomes (two arms, 50/50, 10% vs 10.5%)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from app.experiments.stats import msprt, msprt_path

    rng = np.random.default_rng(0)
    arm = rng.integers(0, 2, n)
    reward = (rng.random(n) < np.where(arm == 1, 0.105, 0.100)).astype(np.float64)
    table = pa.table({"variant": pa.array(np.where(arm == 1, "b", "a")), "reward": reward})
    t0 = time.perf_counter()
    sums = table.group_by("variant").aggregate([("reward", "sum"), ("reward", "count")]).to_pylist()
    agg = {r["variant"]: (r["reward_sum"], r["reward_count"]) for r in sums}
    (xa, na), (xb, nb) = agg["a"], agg["b"]
    pa_, pb_ = xa / na, xb / nb
    one = msprt(pa_, pa_ * (1 - pa_), na, pb_, pb_ * (1 - pb_), nb)
    t1 = time.perf_counter()
    a = table.filter(pc.equal(table["variant"], "a"))["reward"].to_numpy()
    b = table.filter(pc.equal(table["variant"], "b"))["reward"].to_numpy()
    m = min(len(a), len(b))
    path = msprt_path(a[:m], b[:m], looks=[int(x) for x in np.linspace(m / looks, m, looks)])
    t2 = time.perf_counter()
    print(f"mSPRT of {n:,} logged outcomes: aggregate + one look {t1 - t0:.3f} s (p={one.p_value:.4g}, "
          f"effect {one.effect:+.4f} in [{one.ci_low:+.4f}, {one.ci_high:+.4f}]); always-valid path at {looks} "
          f"looks {t2 - t1:.3f} s (final p={path[-1].p_value:.4g})", flush=True)
    return {"rows": n, "one_look_s": t1 - t0, "path_s": t2 - t1, "looks": looks, "p_value": one.p_value,
            "path_p_value": path[-1].p_value}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("serving", "msprt", "all"), default="all")
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per target, level and round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target at c=8 (default 2)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--targets", default="", help="comma-separated subset of " + ", ".join(TARGETS) + " (default all)")
    args = p.parse_args(argv)
    mach = machine_info()
    print(f"machine: {mach['cpu_model']}, {mach['logical_cpus']} logical CPUs, load average "
          f"{' '.join(map(str, mach['load_avg']))}; code {commit()}", flush=True)
    doc: dict[str, Any] = {"benchmark": "traffic", "machine": mach, "commit": commit(),
                           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.part in ("msprt", "all"):
        doc["msprt"] = msprt_bench()
    if args.part in ("serving", "all"):
        doc["serving"] = serving(args)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
