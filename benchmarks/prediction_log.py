"""Prediction log (issue 12, part 5): what logging every prediction costs the serving path, and
what the log's sink takes.

The platform is started as benchmarks/peer_serving.py starts it (its helpers, imported): a local
Ray cluster with the cluster environment of the chosen ingress (``--ingress``, default the
profile's ``haproxy``), ``serve.run`` of ``deployments.app.build`` with one fixed ModelServer
replica, the iris LogisticRegression (scikit-learn's bundled data, seed 0) uploaded as a skops
file. Two endpoints are then created over REST on that same model version:

  log-on    spec.logging {enabled: true, sample_rate: 1.0, fields: every optional field}
  log-off   spec.logging {enabled: false}

Both serve the same multiplexed model in the same ModelServer replica, so the difference is what
the Gateway does to record a prediction (build the record, put it in the replica's bounded
buffer, ship batches to the PredictionLog actor) and what the actor does meanwhile (convert and
write parquet on its timer, on the same machine).

Part 1, serving cost. ``wrk`` (Debian package ``wrk``) drives each endpoint through REST
``/v1/endpoints/{name}/predict`` and V2 ``/v2/models/{name}/infer`` (``--protocols``), one
single-row request at a time per connection, keep-alive, at concurrency 1 and 8, in interleaved
rounds: within a round, level by level, each protocol's on / off pair runs back to back, the
pair's order alternating between rounds (on first in odd rounds, off first in even ones).
Every request carries the client's own ``X-Request-Id`` (so ``client_request_id`` is recorded).
Per target and level: p50 / p99 (median over rounds of wrk's percentiles), req/s (all requests
over all time), and the platform's CPU ms per request (every process under this driver: raylet,
workers, replicas, HAProxy, the PredictionLog actor; the actor writes on its own timer, so part
of one run's writing can fall into the next run's window). The cost of logging is
``p50 on / p50 off - 1`` and ``1 - req/s on / req/s off``; target (issue 12): at most 5% each,
at both levels. The ratios are printed, never asserted.

After the rounds the log is checked: the records the PredictionLog actor received for log-on
(GET /v1/endpoints/log-on/log/stats, the change over the rounds) must lie between the requests
wrk counted as answered and that plus the requests in flight when each wrk run stopped (at most
its concurrency, answered and logged but not counted by wrk); log-off must have none.

Part 2, the sink, measured directly (no HTTP): records built as the Gateway builds them for an
iris request with every field kept (inputs, outputs, caller, client request id; fresh dicts per
record), ``--sink-records`` of them (default 100,000):

  (s1) in-process  PredictionLogService.write in batches of predlog.flush_max_records, then one
                   flush (records -> arrow table -> zstd parquet file): records written per second.
  (s2) the actor   the same, shipped as a replica's buffer ships them (ActorPredictionLog.write,
                   one batch at a time, each awaited), then the actor's flush: records written per
                   second from the first shipment to the last record on disk. This is the
                   sustainable rate of the sink used below.

Part 3, overload: a PredictionLogBuffer of this process, with the platform's buffer settings
(buffer_records, flush_interval_s, flush_max_records) and its ship going to the PredictionLog
actor, is offered ``--overload-factor`` (default 4) times the sustainable rate of (s2) for
``--overload-seconds`` (default 10), paced in small chunks (``add`` only: the records are built
before the window, about 1 KB of memory each) on the event loop that also runs its shipping.
Printed: records offered (and the rate achieved), taken into the buffer, dropped because it was
full, shipped, and what the actor received, wrote and dropped. (The serving path cannot reach
such a rate on a small machine: the sink's rate is printed beside the platform's own throughput.)

    PYTHONPATH=$PWD .venv/bin/python benchmarks/prediction_log.py [--ingress haproxy|proxy]
        [--duration 20] [--rounds 3] [--protocols rest,v2] [--sink-records 100000]
        [--overload-factor 4] [--overload-seconds 10] [--json PATH]

With the defaults the serving part takes 3 rounds x 2 levels x 4 targets x 20 s = 8 minutes,
plus about 1.5 minutes to start and 1 minute for the sink. It uses the whole machine: run it
alone. Interrupting it (Ctrl-C, SIGTERM) shuts Serve and Ray down as peer_serving.py does.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from app.predlog.ids import new_request_id
from app.predlog.records import OPTIONAL_FIELDS, PredictionRecord
from benchmarks import peer_serving as ps
from benchmarks.peer_serving import (
    BUSY_PCT,
    ROW,
    MachineWatch,
    Trees,
    WrkResult,
    commit,
    cpu_delta,
    fit_iris,
    machine_info,
    platform_overrides,
    run_wrk,
    start_platform,
    stop_platform,
    summarize,
    v2_body,
    v2_labels,
    wrk_lua,
)

LEVELS = (1, 8)
PROTOCOLS = ("rest", "v2")
MODES = ("on", "off")
ENDPOINTS = {"on": "log-on", "off": "log-off"}
TARGET_COST_PCT = 5.0  # logging may cost at most this share of p50 and of throughput (issue 12)
CLIENT_REQUEST_ID = "bench-client-0001"
CALLER = "admin"
FEATURES = ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"]


def target_key(protocol: str, mode: str) -> str:
    return f"{protocol}_{mode}"


def label(key: str) -> str:
    protocol, mode = key.split("_")
    name = ENDPOINTS[mode]
    path = f"/v1/endpoints/{name}/predict" if protocol == "rest" else f"/v2/models/{name}/infer"
    return f"{protocol.upper()} logging {mode:<3} {path}"


def endpoint_specs(fields: tuple[str, ...] | list[str]) -> dict[str, dict[str, Any]]:
    """The ``spec`` of each endpoint: log-on records every request with every optional field,
    log-off records nothing."""
    return {
        "on": {"logging": {"enabled": True, "sample_rate": 1.0, "fields": list(fields)}},
        "off": {"logging": {"enabled": False}},
    }


def round_order(rnd: int, protocols: tuple[str, ...] | list[str]) -> list[str]:
    """Targets of one level in round ``rnd`` (0-based): each protocol's on / off pair back to
    back, on first in even-indexed rounds and off first in odd ones, so neither mode always runs
    right after the other protocol's load."""
    modes = MODES if rnd % 2 == 0 else MODES[::-1]
    return [target_key(p, m) for p in protocols for m in modes]


def logging_cost(results: dict[str, dict[str, dict[str, Any]]], protocols, levels=LEVELS) -> dict[str, dict[str, Any]]:
    """Per protocol and level: p50 and throughput with logging on and off, and what logging
    costs in percent (p50: on / off - 1; throughput: 1 - on / off), each against the target."""
    out: dict[str, dict[str, Any]] = {}
    for p in protocols:
        for c in levels:
            on, off = results[target_key(p, "on")][f"c{c}"], results[target_key(p, "off")][f"c{c}"]
            p50_pct = 100.0 * (on["p50_ms"] / off["p50_ms"] - 1.0)
            rps_pct = 100.0 * (1.0 - on["rps"] / off["rps"])
            out[f"{p}_c{c}"] = {
                "p50_on_ms": on["p50_ms"], "p50_off_ms": off["p50_ms"], "p50_cost_pct": p50_pct,
                "rps_on": on["rps"], "rps_off": off["rps"], "throughput_cost_pct": rps_pct,
                "p50_met": p50_pct <= TARGET_COST_PCT, "throughput_met": rps_pct <= TARGET_COST_PCT,
            }
    return out


def records_check(answered: int, in_flight: int, logged: int) -> dict[str, Any]:
    """Whether the log holds a record for every answered request: ``answered`` (wrk's count)
    <= ``logged`` <= ``answered + in_flight`` (the requests a stopping wrk leaves in flight are
    answered and logged, but not counted)."""
    return {"answered": answered, "in_flight_allowance": in_flight, "logged": logged,
            "ok": answered <= logged <= answered + in_flight, "missing": max(0, answered - logged)}


def due(rate: float, elapsed_s: float, offered: int, cap: int) -> int:
    """Records to offer now to keep ``rate`` per second since the start, at most ``cap`` at a
    time (the pacing loop yields between chunks, so shipping can run)."""
    return max(0, min(cap, int(rate * elapsed_s) - offered))


def make_record(i: int, endpoint: str, now: float, protocol: str = "rest"):
    """A record as the Gateway makes it for one single-row iris request with every field kept:
    fresh input and output dicts (parsed from the request and the model's answer), shared
    feature names (the Gateway caches them per model version)."""
    return PredictionRecord(
        request_id=new_request_id(now), timestamp=now, endpoint=endpoint, variant="", model="iris",
        model_version="1", latency_ms=1.0 + (i % 97) / 100.0,
        inputs={"instances": [[ROW[0] + (i % 7) / 10.0, ROW[1], ROW[2], ROW[3]]]}, feature_names=FEATURES,
        outputs={"predictions": [i % 3]}, caller=CALLER, client_request_id=f"client-{i}", protocol=protocol,
    )


def batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


# -- the platform's endpoints and the log's counters ----------------------------------------------
def create_endpoints(base: str, token: str, rows: list[list[float]], expected: list[int]) -> str:
    """log-on and log-off on the model version of endpoint iris (start_platform's); checks the
    stored spec and that both answer scikit-learn's labels on both paths. Returns the target."""
    import httpx

    specs = endpoint_specs(OPTIONAL_FIELDS)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        r = c.get("/v1/endpoints/iris")
        r.raise_for_status()
        target = r.json()["target"]
        for mode, name in ENDPOINTS.items():
            r = c.post("/v1/endpoints", json={"name": name, "target": target, "spec": specs[mode]})
            if r.status_code != 201:
                raise RuntimeError(f"creating endpoint {name} failed: {r.status_code} {r.text[:500]}")
            stored = (r.json().get("spec") or {}).get("logging") or {}
            want = specs[mode]["logging"]
            if any(stored.get(k) != v for k, v in want.items()):
                raise RuntimeError(f"endpoint {name}: spec.logging is {stored}, not {want}")
        for name in ENDPOINTS.values():
            for _ in range(60):  # the Gateway learns of a new endpoint through the feed (within 1 s)
                r = c.post(f"/v1/endpoints/{name}/predict", json={"instances": rows})
                if r.status_code == 200:
                    break
                time.sleep(0.5)
            if r.status_code != 200 or [int(v) for v in r.json()["predictions"]] != expected:
                raise RuntimeError(f"{name} REST: {r.status_code} {r.text[:300]} (expected {expected})")
            r = c.post(f"/v2/models/{name}/infer", json=v2_body(rows))
            if r.status_code != 200 or v2_labels(r.json()) != expected:
                raise RuntimeError(f"{name} V2: {r.status_code} {r.text[:300]} (expected {expected})")
    print(f"endpoints log-on and log-off on {target}; both predict scikit-learn's labels on the {len(rows)} test "
          "rows (REST and V2)", flush=True)
    return target


def log_stats(base: str, token: str, name: str) -> dict[str, Any] | None:
    """GET /v1/endpoints/{name}/log/stats; None when this checkout has no prediction log
    (the route is missing or answers 503)."""
    import httpx

    r = httpx.get(f"{base}/v1/endpoints/{name}/log/stats", headers={"Authorization": f"Bearer {token}"}, timeout=30)
    if r.status_code in (404, 405, 503):
        return None
    r.raise_for_status()
    return r.json()


def settled_stats(base: str, token: str, name: str, quiet_s: float = 3.0, timeout_s: float = 60.0):
    """The log's stats of ``name`` once ``received`` and ``written`` stop changing for
    ``quiet_s`` (the replicas ship every flush_interval_s, the actor writes every
    write_interval_s) and nothing is pending; None without a prediction log."""
    deadline = time.monotonic() + timeout_s
    last, since = None, time.monotonic()
    while True:
        s = log_stats(base, token, name)
        if s is None:
            return None
        key = (s.get("received"), s.get("written"), s.get("pending"))
        if key != last:
            last, since = key, time.monotonic()
        elif time.monotonic() - since >= quiet_s and not s.get("pending"):
            return s
        if time.monotonic() > deadline:
            print(f"WARNING: the log's counters of {name} did not settle within {timeout_s:.0f}s: {s}", flush=True)
            return s
        time.sleep(0.5)


# -- the sink --------------------------------------------------------------------------------------
def sink_in_process(settings, n: int) -> dict[str, Any]:
    """(s1): PredictionLogService of this process, writing into its own folder."""
    from app.predlog.service import PredictionLogService

    service = PredictionLogService(settings)
    now = time.time()
    records = [make_record(i, "sink-s1", now) for i in range(n)]
    t0 = time.perf_counter()
    for batch in batches(records, settings.predlog.flush_max_records):
        service.write(batch, {})
    t1 = time.perf_counter()
    done = service.flush()
    t2 = time.perf_counter()
    stats = service.stats("sink-s1")
    return {"records": n, "written": done["records"], "files": stats["files"], "bytes": stats["bytes"],
            "receive_s": t1 - t0, "write_s": t2 - t1, "records_per_s": n / (t2 - t0)}


async def prediction_log(settings):
    """The platform's PredictionLog actor (created when this checkout's Gateway has not made
    it), answering: its start-up is not part of any measurement."""
    from actors.prediction_log import get_prediction_log
    from app.predlog.control import ActorPredictionLog

    actor = get_prediction_log(settings.shared_kwargs(), settings)
    await actor.ping.remote()
    return ActorPredictionLog(actor, timeout_s=60.0, erase_timeout_s=600.0)


async def _sink_actor(settings, n: int) -> dict[str, Any]:
    log = await prediction_log(settings)
    now = time.time()
    records = [make_record(i, "sink-s2", now) for i in range(n)]
    t0 = time.perf_counter()
    for batch in batches(records, settings.predlog.flush_max_records):
        await log.write(batch, {})
    t1 = time.perf_counter()
    await log.flush()
    t2 = time.perf_counter()
    stats = await log.stats("sink-s2")
    return {"records": n, "received": stats["received"], "written": stats["written"], "files": stats["files"],
            "bytes": stats["bytes"], "ship_s": t1 - t0, "write_s": t2 - t1, "records_per_s": n / (t2 - t0)}


async def _overload(settings, rate: float, seconds: float) -> dict[str, Any]:
    from app.predlog.buffer import PredictionLogBuffer

    endpoint = "sink-overload"
    log = await prediction_log(settings)
    # Built before the window, so that the offering costs what the serving path's add costs.
    now = time.time()
    records = [make_record(i, endpoint, now) for i in range(int(rate * seconds) + 1)]
    buffer = PredictionLogBuffer.from_settings(settings, log.write)
    buffer.start()
    cap = max(1, int(rate / 200))  # ~5 ms of records per chunk
    offered = 0
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < seconds:
        for _ in range(due(rate, elapsed, offered, min(cap, len(records) - offered))):
            buffer.add(records[offered])
            offered += 1
        await asyncio.sleep(0)
    del records
    window = time.perf_counter() - t0
    during = buffer.stats()
    t1 = time.perf_counter()
    # Drained by its own shipping task: close() now would cancel a shipment in flight.
    while time.perf_counter() - t1 < 120.0:
        now_stats = buffer.stats()
        if now_stats["buffered"] == 0 and now_stats["shipped"] >= now_stats["added"]:
            break
        await asyncio.sleep(0.05)
    drain_s = time.perf_counter() - t1
    await buffer.close()
    after = buffer.stats()
    await log.flush()
    actor = await log.stats(endpoint)
    return {
        "target_rate": rate, "seconds": window, "offered": offered, "offered_rate": offered / window,
        "taken": during["added"], "dropped_buffer_full": during["dropped"], "shipped_in_window": during["shipped"],
        "buffered_at_end": during["buffered"], "shipped_total": after["shipped"], "drain_s": drain_s,
        "ship_failures": after["ship_failures"], "buffer_capacity": during["capacity"],
        "actor_received": actor["received"], "actor_written": actor["written"],
        "actor_dropped": actor["dropped"], "actor_overflow": actor["dropped"] - after["dropped"],
    }


# -- report ----------------------------------------------------------------------------------------
def print_table(results: dict[str, dict[str, dict[str, Any]]], keys: list[str]) -> None:
    head = f"{'target':<58}{'c':>4}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}{'CPU ms/req':>12}"
    print(head)
    print("-" * len(head))
    for c in LEVELS:
        for key in keys:
            r = results[key][f"c{c}"]
            print(f"{label(key):<58}{c:>4}{r['requests']:>10}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                  f"{r['rps']:>9.0f}{r['cpu_ms_per_request']:>12.2f}")


def print_costs(costs: dict[str, dict[str, Any]]) -> None:
    print(f"cost of logging (every field, sample rate 1.0) against logging off; target <= {TARGET_COST_PCT:g}% each:")
    for name, v in costs.items():
        protocol, level = name.split("_")
        print(f"  {protocol.upper():<4} {level:<4} p50 {v['p50_on_ms']:.2f} vs {v['p50_off_ms']:.2f} ms: "
              f"{v['p50_cost_pct']:+6.1f}% {'MET' if v['p50_met'] else 'NOT MET':<8} throughput {v['rps_on']:.0f} vs "
              f"{v['rps_off']:.0f} req/s: {v['throughput_cost_pct']:+6.1f}% "
              f"{'MET' if v['throughput_met'] else 'NOT MET'}")


def markdown_table(costs: dict[str, dict[str, Any]]) -> str:
    lines = ["| path | c | p50 on / off ms | p50 cost | req/s on / off | throughput cost |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, v in costs.items():
        protocol, level = name.split("_")
        lines.append(f"| {protocol.upper()} | {level[1:]} | {v['p50_on_ms']:.2f} / {v['p50_off_ms']:.2f} | "
                     f"{v['p50_cost_pct']:+.1f}% | {v['rps_on']:.0f} / {v['rps_off']:.0f} | "
                     f"{v['throughput_cost_pct']:+.1f}% |")
    return "\n".join(lines)


def _exit_on_signal(signum, _frame) -> None:
    raise SystemExit(128 + signum)


def _stop_children(pids: list[int]) -> None:
    """Terminate those of ``pids`` that are still children of this process (a wrk run cut short)."""
    import psutil

    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.ppid() == os.getpid():
                proc.terminate()
        except psutil.Error:
            pass


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                   help="the platform's ingress mode (http.ingress.mode; default haproxy, the profile's)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per target, level and round (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per target at c=8 (default 3)")
    p.add_argument("--protocols", default=",".join(PROTOCOLS),
                   help="paths to measure: rest, v2 or both (default rest,v2)")
    p.add_argument("--sink-records", type=int, default=100_000, help="records per sink measurement (default 100000)")
    p.add_argument("--overload-factor", type=float, default=4.0, help="offered / sustainable sink rate (default 4)")
    p.add_argument("--overload-seconds", type=float, default=10.0, help="seconds of overload (default 10)")
    p.add_argument("--json", metavar="PATH", help="write everything as JSON to PATH")
    args = p.parse_args(argv)
    protocols = [x.strip() for x in args.protocols.split(",") if x.strip()]
    if not protocols or any(x not in PROTOCOLS for x in protocols):
        p.error(f"--protocols: a comma-separated list of {', '.join(PROTOCOLS)}")
    if args.duration < 1 or args.rounds < 1 or args.sink_records < 1 or args.overload_seconds <= 0:
        p.error("--duration, --rounds, --sink-records must be at least 1, --overload-seconds positive")
    wrk_exe = ps.WRK if Path(ps.WRK).exists() else shutil.which("wrk")
    if not wrk_exe:
        print("wrk is not installed: `sudo apt-get install wrk` (Debian / Ubuntu package wrk)", file=sys.stderr)
        return 2
    ps.WRK = wrk_exe
    keys = [target_key(pr, m) for pr in protocols for m in MODES]

    started = time.perf_counter()
    mach = machine_info()
    print(f"machine: {mach['cpu_model']}, {mach['logical_cpus']} logical CPUs, load average "
          f"{' '.join(map(str, mach['load_avg']))}; code {commit()}", flush=True)
    if mach["load_avg"][0] > 0.5 * (mach["logical_cpus"] or 1):
        print(f"WARNING: the machine is busy before the start (1-minute load {mach['load_avg'][0]})", flush=True)

    est, X_test = fit_iris()
    rows = X_test.tolist()
    expected = [int(v) for v in est.predict(X_test)]

    home = tempfile.mkdtemp(prefix="matih-predlog-")
    workdir = Path(tempfile.mkdtemp(prefix="matih-predlog-wrk-"))
    os.environ["MATIH_HOME"] = home
    from app.serving.ingress import apply_cluster_env, mode_in_effect
    from app.settings import load_settings

    overrides = platform_overrides(home, args.ingress)
    settings = load_settings("local", **overrides)
    env = apply_cluster_env(settings)
    if mode_in_effect() != args.ingress:
        raise SystemExit(f"the environment selects ingress {mode_in_effect()!r}, not {args.ingress!r}: "
                         f"unset {', '.join(env)}")
    print(f"platform ingress: {args.ingress}; prediction log: predlog.enabled {settings.predlog.enabled}, buffer "
          f"{settings.predlog.buffer_records} records, shipped every {settings.predlog.flush_interval_s:g} s or "
          f"{settings.predlog.flush_max_records} records, written every {settings.predlog.write_interval_s:g} s",
          flush=True)

    import ray

    trees = Trees()
    doc: dict[str, Any] = {}
    wrk_pids: list[int] = []
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        # Ray's core worker aborts the driver on SIGTERM (no finally, temporary folders left, a
        # wrk run going on); as SystemExit the cleanup below runs, as it does on Ctrl-C.
        signal.signal(signal.SIGTERM, _exit_on_signal)
        base, token = start_platform(home, overrides, est)
        target = create_endpoints(base, token, rows, expected)

        urls, scripts = {}, {}
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}",
                   "X-Request-Id": CLIENT_REQUEST_ID}
        for key in keys:
            protocol, mode = key.split("_")
            name = ENDPOINTS[mode]
            path = f"/v1/endpoints/{name}/predict" if protocol == "rest" else f"/v2/models/{name}/infer"
            urls[key] = base + path
            body = json.dumps({"instances": [ROW]} if protocol == "rest" else v2_body([ROW]))
            scripts[key] = workdir / f"{key}.lua"
            scripts[key].write_text(wrk_lua(body, headers))

        for key in keys:  # warm-up: caches, connection pools, the buffer's shipping task
            w, _ = run_wrk(urls[key], scripts[key], 8, args.warmup)
            if w.errors:
                raise RuntimeError(f"{label(key)}: {w.errors} errors in the warm-up: {w}")
        before_log = {m: settled_stats(base, token, ENDPOINTS[m]) for m in MODES}
        has_log = before_log["on"] is not None
        if not has_log:
            print("NOTE: this checkout has no prediction log (GET /v1/endpoints/log-on/log/stats is missing): "
                  "logging on and off do the same work, and parts 2 and 3 are skipped", flush=True)

        print(f"measuring: {args.rounds} rounds x levels {LEVELS} x {len(keys)} targets x {args.duration:g} s, "
              "level-major, on / off pairs back to back, alternating order", flush=True)
        runs: dict[tuple[str, int], list[WrkResult]] = {(k, c): [] for k in keys for c in LEVELS}
        cpu: dict[tuple[str, int], float] = {(k, c): 0.0 for k in keys for c in LEVELS}
        raw: list[dict[str, Any]] = []
        watch = MachineWatch()
        for rnd in range(args.rounds):
            for c in LEVELS:
                for key in round_order(rnd, protocols):
                    wrk_pids.clear()
                    snap = trees.snapshot()
                    res, text = run_wrk(urls[key], scripts[key], c, args.duration, on_start=wrk_pids.append)
                    used = cpu_delta(snap, trees.snapshot(exclude=tuple(wrk_pids))).get("platform", 0.0)
                    if res.errors:
                        raise RuntimeError(f"{label(key)} at c={c}, round {rnd + 1}: {res.non_2xx} non-2xx "
                                           f"responses, socket errors {res.socket_errors}\n{text}")
                    runs[(key, c)].append(res)
                    cpu[(key, c)] += used
                    raw.append({"round": rnd + 1, "target": key, "concurrency": c, **asdict(res), "server_cpu_s": used})
                    print(f"  round {rnd + 1} c={c:<2} {label(key):<58} p50 {res.p50_ms:7.2f} ms  p99 "
                          f"{res.p99_ms:7.2f} ms  {res.rps:7.0f} req/s  CPU {1000 * used / res.requests:6.2f} ms/req",
                          flush=True)
        background = watch.report()

        results = {k: {f"c{c}": summarize(runs[(k, c)], cpu[(k, c)]) for c in LEVELS} for k in keys}
        costs = logging_cost(results, protocols)
        print()
        print_table(results, keys)
        print()
        print_costs(costs)
        disturbed = background["other_processes_cpu_pct"] > BUSY_PCT
        print(f"\nCPU while measuring (share of all {os.cpu_count()} CPUs): this benchmark "
              f"{background['this_benchmark_cpu_pct']}%, other processes {background['other_processes_cpu_pct']}%")
        if disturbed:
            print(f"WARNING: other processes used over {BUSY_PCT:g}% of the CPUs while measuring: the numbers are "
                  "disturbed; run again when the machine is quiet")

        check: dict[str, Any] | None = None
        sink: dict[str, Any] = {}
        if has_log:
            after_log = {m: settled_stats(base, token, ENDPOINTS[m]) for m in MODES}
            on_keys = [k for k in keys if k.endswith("_on")]
            answered = sum(r.requests for k in on_keys for c in LEVELS for r in runs[(k, c)])
            in_flight = sum(c * len(runs[(k, c)]) for k in on_keys for c in LEVELS)
            delta = {m: {f: after_log[m][f] - before_log[m][f] for f in ("received", "written", "dropped")}
                     for m in MODES}
            check = {**records_check(answered, in_flight, delta["on"]["written"]), "log_on": delta["on"],
                     "log_off": delta["off"], "log_off_ok": delta["off"]["received"] == 0,
                     "stats_after": after_log}
            print(f"\nthe log after the rounds: log-on received {delta['on']['received']}, wrote "
                  f"{delta['on']['written']}, dropped {delta['on']['dropped']} records; wrk counted {answered} "
                  f"answered "
                  f"(+ at most {in_flight} in flight at wrk's stops): {'OK' if check['ok'] else 'MISMATCH'}; "
                  f"log-off received {delta['off']['received']}: {'OK' if check['log_off_ok'] else 'MISMATCH'}",
                  flush=True)

            print(f"\nsink (s1) in-process PredictionLogService, {args.sink_records} records ...", flush=True)
            s1_settings = load_settings("local", **{**overrides, "predlog": {
                **settings.predlog.model_dump(mode="json"), "root": str(Path(home) / "sink-s1")}})
            sink["in_process"] = sink_in_process(s1_settings, args.sink_records)
            s = sink["in_process"]
            print(f"  {s['records_per_s']:,.0f} records/s written ({s['receive_s']:.2f} s to take them in batches of "
                  f"{settings.predlog.flush_max_records}, {s['write_s']:.2f} s to write {s['files']} file(s), "
                  f"{s['bytes'] / 1e6:.1f} MB)", flush=True)
            print(f"sink (s2) the PredictionLog actor, {args.sink_records} records shipped as a replica ships them ...",
                  flush=True)
            sink["actor"] = asyncio.run(_sink_actor(settings, args.sink_records))
            s = sink["actor"]
            print(f"  {s['records_per_s']:,.0f} records/s written ({s['ship_s']:.2f} s shipping, {s['write_s']:.2f} s "
                  f"until written; received {s['received']}, written {s['written']})", flush=True)
            best_rps = max(results[k]["c8"]["rps"] for k in keys)
            print(f"  the sink's rate is {s['records_per_s'] / best_rps:,.0f}x the platform's best throughput here "
                  f"({best_rps:.0f} req/s at c=8)", flush=True)

            rate = args.overload_factor * s["records_per_s"]
            print(f"overload: {args.overload_factor:g}x the sustainable rate (s2) = {rate:,.0f} records/s offered to a "
                  f"PredictionLogBuffer of this process (ship -> the actor) for {args.overload_seconds:g} s (records "
                  f"built first: about {rate * args.overload_seconds / 1e6:.1f} GB of memory) ...", flush=True)
            sink["overload"] = asyncio.run(_overload(settings, rate, args.overload_seconds))
            o = sink["overload"]
            short = o["offered_rate"] < 0.95 * rate
            print(f"  offered {o['offered']:,} records ({o['offered_rate']:,.0f}/s"
                  f"{', SHORT of the target: the generator could not keep up' if short else ''}); buffer (capacity "
                  f"{o['buffer_capacity']:,}) took {o['taken']:,}, dropped {o['dropped_buffer_full']:,} "
                  f"({100 * o['dropped_buffer_full'] / max(1, o['offered']):.1f}%) when full; shipped "
                  f"{o['shipped_in_window']:,} in the window, {o['shipped_total']:,} after draining "
                  f"{o['drain_s']:.1f} s; actor received {o['actor_received']:,}, wrote {o['actor_written']:,}, "
                  f"dropped {o['actor_overflow']:,} of its own (actor_max_pending_records)", flush=True)
            o["short_of_target"] = short

        print("\n" + markdown_table(costs))
        total = time.perf_counter() - started
        print(f"\ntotal run time {total:.0f}s", flush=True)
        doc = {
            "benchmark": "prediction_log",
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "commit": commit(),
            "machine": {**mach, "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
            "config": {"ingress": args.ingress, "cluster_env": env, "duration_s": args.duration, "rounds": args.rounds,
                       "levels": list(LEVELS), "protocols": protocols, "row": ROW, "target": target,
                       "specs": endpoint_specs(["<every optional field>"]), "predlog": settings.predlog.model_dump(),
                       "sink_records": args.sink_records, "overload_factor": args.overload_factor,
                       "overload_seconds": args.overload_seconds},
            "results": results, "logging_cost": costs, "target_cost_pct": TARGET_COST_PCT,
            "records_check": check, "sink": sink, "background_cpu": {**background, "disturbed": disturbed},
            "runs": raw, "total_s": total,
        }
        if args.json:
            Path(args.json).write_text(json.dumps(doc, indent=2, default=str) + "\n")
            print(f"results written to {args.json}")
    finally:
        _stop_children(wrk_pids)
        try:
            stop_platform()
        finally:
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
