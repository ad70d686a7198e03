"""Ensembles (issue 13, part 5): what serving an ensemble costs next to its members, through the
platform over HTTP.

The platform is started as benchmarks/peer_serving.py starts it (its helpers, imported, as
benchmarks/prediction_log.py does): a local Ray cluster with the chosen ingress, ``serve.run``
of ``deployments.app.build`` with one fixed ModelServer replica, the iris LogisticRegression
(scikit-learn's bundled data, seed 0) uploaded as a skops file and converted to ONNX (endpoint
``iris``). The same estimator is uploaded twice more (``iris-b``, ``iris-c``): three members of
identical cost, so "the slowest member alone" is any one of them (``iris``). The ensemble is a
soft vote of the three, created through ``POST /v1/ensembles`` (which also stores a fused ONNX
graph when it can).

Targets (REST ``/v1/endpoints/{name}/predict``, one single-row request per call, keep-alive):

  member-gw   iris alone, in the Gateway (the default placement of an ONNX model on CPU)
  member-ms   iris alone, config.placement model_server (a ModelServer replica)
  fanout-gw   the ensemble, fanned out by the Gateway replica (members inline: no handle hop)
  fanout-ms   the ensemble, placement model_server: the Ensemble deployment fans out to the
              ModelServer replica (one handle hop to Ensemble, three multiplexed hops on)
  fused       the ensemble's fused ONNX graph (config.ensemble fused), when it has one

Each target runs at concurrency 1 and 8, in interleaved rounds (``--rounds``; within a round,
level by level, every target once, the order rotating between rounds). The driver is ``wrk``
when installed (as the other benchmarks), else an asyncio httpx client in this process (printed).
Per target and level: p50 / p99 (median over rounds), req/s (all requests over all time).
Ratios (printed, never asserted): fanout-gw / member-gw and fanout-ms / member-ms p50 (target
<= 1.3x), fused / fanout-gw and fused / fanout-ms p50 (target <= 0.6x).

``--part bagging`` runs benchmarks/ensemble_training.py's ``main`` (Ray-parallel bagging vs
sequential training) instead, when that file exists; ``--part all`` runs both.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/ensembles.py [--part serving|bagging|all]
        [--ingress haproxy|proxy] [--duration 10] [--rounds 3] [--json PATH]

It uses the whole machine: run it alone (under the integration lock where tests share the
machine). Interrupting it shuts Serve and Ray down.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks import peer_serving as ps
from benchmarks.peer_serving import ROW, WrkResult, commit, fit_iris, machine_info, platform_overrides, start_platform, stop_platform

LEVELS = (1, 8)
TARGETS = ("member-gw", "member-ms", "fanout-gw", "fanout-ms", "fused")
TARGET_FANOUT = 1.3  # fan-out p50 / its slowest member's p50 (issue 13)
TARGET_FUSED = 0.6  # fused p50 / fan-out p50
ENSEMBLE = "iris-ens"
MEMBERS = ("iris", "iris-b", "iris-c")


# -- the driver -------------------------------------------------------------------------------------
async def _drive(url: str, body: bytes, headers: dict[str, str], concurrency: int, duration_s: float) -> WrkResult:
    """``concurrency`` keep-alive clients posting ``body`` back to back for ``duration_s``."""
    import httpx
    import numpy as np

    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=10) as client:
        stop = time.perf_counter() + duration_s

        async def worker():
            nonlocal errors
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.post(url, content=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200:
                    errors += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    ms = np.asarray(latencies) * 1000.0
    pct = (lambda q: float(np.percentile(ms, q))) if len(ms) else (lambda q: float("nan"))
    return WrkResult(len(ms), elapsed, len(ms) / elapsed, pct(50), pct(75), pct(90), pct(99), errors, {})


def measure(url: str, body: dict[str, Any], headers: dict[str, str], concurrency: int, duration_s: float,
            workdir: Path) -> WrkResult:
    """One run: wrk when installed (as benchmarks/peer_serving.py), else the httpx driver."""
    text = json.dumps(body)
    if ps.WRK:
        script = workdir / f"body-{abs(hash(text))}.lua"
        script.write_text(ps.wrk_lua(text, headers))
        return ps.run_wrk(url, script, concurrency, duration_s)[0]
    return asyncio.run(_drive(url, text.encode(), {**headers}, concurrency, duration_s))


# -- the ensemble and its endpoints -------------------------------------------------------------------
def create_targets(base: str, token: str, est) -> dict[str, str]:
    """Members, the ensemble and one endpoint per target; returns target -> predict URL (fused
    only when the ensemble version has a fused graph)."""
    import httpx
    import skops.io

    urls: dict[str, str] = {}
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        versions = {"iris": c.get("/v1/endpoints/iris").json()["model_version"]}
        for name in MEMBERS[1:]:
            r = c.post(f"/v1/models/{name}/versions", files={"file": ("iris.skops", skops.io.dumps(est))},
                       data={"format": "skops"})
            r.raise_for_status()
            versions[name] = r.json()["version"]
        r = c.post("/v1/ensembles", json={"name": ENSEMBLE, "task": "classification", "method": "voting",
                                          "voting": "soft",
                                          "members": [{"model": f"{m}/{versions[m]}"} for m in MEMBERS]})
        if r.status_code not in (200, 201):
            raise RuntimeError(f"creating the ensemble failed: {r.status_code} {r.text[:500]}")
        version = str(r.json()["model_version"])
        target = f"{ENSEMBLE}/{version}"
        tags = c.get(f"/v1/models/{ENSEMBLE}/versions/{version}").json().get("tags", {})
        fused = "onnx" in json.loads(tags.get("matih.formats", "[]"))
        configs = {
            "member-gw": ("iris", f"iris/{versions['iris']}", {}),
            "member-ms": ("iris-ms", f"iris/{versions['iris']}", {"placement": "model_server"}),
            "fanout-gw": ("ens-gw", target, {"placement": "gateway"}),
            "fanout-ms": ("ens-ms", target, {"placement": "model_server"}),
        }
        if fused:
            configs["fused"] = ("ens-fused", target, {"ensemble": "fused"})
        else:
            print(f"{target} has no fused graph: the fused target is left out", flush=True)
        for key, (name, tgt, config) in configs.items():
            if name != "iris":
                r = c.post("/v1/endpoints", json={"name": name, "target": tgt, "config": config})
                if r.status_code != 201:
                    raise RuntimeError(f"endpoint {name}: {r.status_code} {r.text[:500]}")
            for _ in range(60):  # the first call loads the models where they run
                r = c.post(f"/v1/endpoints/{name}/predict", json={"instances": [ROW]})
                if r.status_code == 200:
                    break
                time.sleep(0.5)
            if r.status_code != 200 or r.json().get("degraded"):
                raise RuntimeError(f"{key}: {r.status_code} {r.text[:300]}")
            urls[key] = f"{base}/v1/endpoints/{name}/predict"
    print(f"members {', '.join(f'{m}/{v}' for m, v in versions.items())}; ensemble {target}; targets "
          f"{', '.join(urls)}", flush=True)
    return urls


# -- report ---------------------------------------------------------------------------------------------
def summarize(runs: list[WrkResult]) -> dict[str, Any]:
    requests = sum(r.requests for r in runs)
    seconds = sum(r.duration_s for r in runs)
    return {"rounds": len(runs), "requests": requests, "p50_ms": statistics.median(r.p50_ms for r in runs),
            "p99_ms": statistics.median(r.p99_ms for r in runs),
            "p50_ms_range": [min(r.p50_ms for r in runs), max(r.p50_ms for r in runs)],
            "rps": requests / seconds if seconds else 0.0}


def run_rounds(urls: dict[str, str], keys: list[str], levels: tuple[int, ...], args, headers: dict[str, str],
               body: dict[str, Any], workdir: Path) -> dict[str, dict[str, dict[str, Any]]]:
    """Every target of ``keys`` at every level, in ``args.rounds`` interleaved rounds (level by
    level, the order rotating), after an ``args.warmup`` s warm-up each at c=8; prints each run
    and the summary table; returns target -> "c<level>" -> :func:`summarize`."""
    for key in keys:  # warm-up
        measure(urls[key], body, headers, 8, args.warmup, workdir)
    runs: dict[tuple[str, int], list[WrkResult]] = {(k, c): [] for k in keys for c in levels}
    print(f"measuring: {args.rounds} rounds x levels {levels} x {len(keys)} targets x {args.duration:g} s, "
          "interleaved, order rotating", flush=True)
    for rnd in range(args.rounds):
        order = keys[rnd % len(keys):] + keys[:rnd % len(keys)]
        for c in levels:
            for key in order:
                res = measure(urls[key], body, headers, c, args.duration, workdir)
                if res.errors:
                    raise RuntimeError(f"{key} c={c} round {rnd + 1}: {res.errors} errors")
                runs[(key, c)].append(res)
                print(f"  round {rnd + 1} c={c:<2} {key:<10} p50 {res.p50_ms:7.2f} ms  p99 {res.p99_ms:7.2f} ms  "
                      f"{res.rps:7.0f} req/s", flush=True)
    results = {k: {f"c{c}": summarize(runs[(k, c)]) for c in levels} for k in keys}
    print(f"\n{'target':<12}{'c':>4}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}")
    for c in levels:
        for k in keys:
            r = results[k][f"c{c}"]
            print(f"{k:<12}{c:>4}{r['requests']:>10}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['rps']:>9.0f}")
    return results


def ratios(results: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per level: each fan-out's p50 over its member's (same placement) and fused over fan-out."""
    pairs = {"fanout_gw_vs_member": ("fanout-gw", "member-gw", TARGET_FANOUT),
             "fanout_ms_vs_member": ("fanout-ms", "member-ms", TARGET_FANOUT),
             "fused_vs_fanout_gw": ("fused", "fanout-gw", TARGET_FUSED),
             "fused_vs_fanout_ms": ("fused", "fanout-ms", TARGET_FUSED)}
    out: dict[str, dict[str, Any]] = {}
    for name, (a, b, target) in pairs.items():
        if a not in results or b not in results:
            continue
        for c in LEVELS:
            ra, rb = results[a][f"c{c}"], results[b][f"c{c}"]
            ratio = ra["p50_ms"] / rb["p50_ms"]
            out[f"{name}_c{c}"] = {"p50_ratio": ratio, "target": target, "met": ratio <= target,
                                   "rps_ratio": ra["rps"] / rb["rps"] if rb["rps"] else float("nan")}
    return out


@contextmanager
def served_platform(args, prefix: str):
    """The platform on a local Ray cluster for one benchmark (peer_serving's helpers), the iris
    estimator registered as endpoint ``iris``; yields (base URL, admin token, estimator,
    cluster env, a scratch folder). Serve and Ray go down and the folders go on the way out."""
    ps.WRK = ps.WRK if Path(ps.WRK).exists() else shutil.which("wrk")
    print(f"driver: {'wrk ' + ps.WRK if ps.WRK else 'httpx (asyncio, this process; wrk is not installed)'}",
          flush=True)
    est, _ = fit_iris()
    home = tempfile.mkdtemp(prefix=f"{prefix}-")
    workdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-wrk-"))
    os.environ["MATIH_HOME"] = home
    from app.serving.ingress import apply_cluster_env
    from app.settings import load_settings

    overrides = platform_overrides(home, args.ingress)
    env = apply_cluster_env(load_settings("local", **overrides))
    import ray

    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        signal.signal(signal.SIGTERM, lambda signum, _f: (_ for _ in ()).throw(SystemExit(128 + signum)))
        base, token = start_platform(home, overrides, est)
        yield base, token, est, env, workdir
    finally:
        try:
            stop_platform()
        finally:
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(workdir, ignore_errors=True)


def print_ratios(rat: dict[str, dict[str, Any]]) -> None:
    print("\nratios of p50 (target in brackets):")
    for name, v in rat.items():
        print(f"  {name:<28} {v['p50_ratio']:.2f}x (<= {v['target']:g}x) {'MET' if v['met'] else 'NOT MET'}; "
              f"throughput ratio {v['rps_ratio']:.2f}")


def serving(args) -> dict[str, Any]:
    with served_platform(args, "matih-ens") as (base, token, est, env, workdir):
        urls = create_targets(base, token, est)
        keys = [k for k in TARGETS if k in urls and (not args.targets or k in args.targets.split(","))]
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        results = run_rounds(urls, keys, LEVELS, args, headers, {"instances": [ROW]}, workdir)
        rat = ratios(results)
        print_ratios(rat)
        return {"config": {"ingress": args.ingress, "cluster_env": env, "duration_s": args.duration,
                           "rounds": args.rounds, "levels": list(LEVELS), "driver": ps.WRK or "httpx"},
                "results": results, "ratios": rat}


def bagging(argv: list[str]) -> Any:
    """benchmarks/ensemble_training.py's ``main`` (the training part of issue 13), when present."""
    path = Path(__file__).with_name("ensemble_training.py")
    if not path.exists():
        print("benchmarks/ensemble_training.py is not on this checkout: the bagging part is skipped", flush=True)
        return None
    spec = importlib.util.spec_from_file_location("benchmarks.ensemble_training", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--part", choices=("serving", "bagging", "all"), default="serving")
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per target, level and round (default 10)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per target at c=8 (default 2)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--targets", default="", help="comma-separated subset of " + ", ".join(TARGETS) + " (default all)")
    args, rest = p.parse_known_args(argv)
    mach = machine_info()
    print(f"machine: {mach['cpu_model']}, {mach['logical_cpus']} logical CPUs, load average "
          f"{' '.join(map(str, mach['load_avg']))}; code {commit()}", flush=True)
    doc: dict[str, Any] = {"benchmark": "ensembles", "machine": mach, "commit": commit(),
                           "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if args.part in ("serving", "all"):
        doc["serving"] = serving(args)
    if args.part in ("bagging", "all"):
        doc["bagging"] = bagging(rest)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
