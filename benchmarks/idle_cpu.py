"""Idle cost (issue 11): the CPU the platform's processes use while no request arrives.

The script starts a local Ray cluster the way the platform starts one (the cluster environment
of app/serving/ingress.py applied first, then ``ray.init(address="local")``), deploys the
platform as benchmarks/serving_overhead.py does (optionally with iris trained and an endpoint
serving it, so a model is loaded), waits for a quiet period, then reads the CPU time of every
process of the cluster (this driver and all its descendants: GCS, raylet, the dashboard and its
agents when on, Serve's controller, proxy / HAProxy manager and haproxy, the Gateway and
ModelServer replicas, the detached actors) at the start and the end of a window, and prints a
table sorted by CPU, each process named by its Ray proctitle, and the total as % of one core.

    .venv/bin/python benchmarks/idle_cpu.py [--window 60] [--quiet 30] [--dashboard] [--model]

--dashboard starts the dashboard, as ``serve run`` does (its cluster has one). The target is a
total of at most 5% of one core. The sampling itself costs this process a few CPU-milliseconds
per window (psutil reads /proc twice); the driver's own line shows what it used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.serving_overhead import BODY, free_port, platform_settings, train_iris  # noqa: E402

TARGET_PCT = 5.0


def process_name(proc) -> str:
    """A readable name: the Ray proctitle (``ray::ServeReplica:matih:Gateway``), else the
    executable with its first telling argument (``raylet``, ``gcs_server``, ``haproxy``)."""
    try:
        cmdline = proc.cmdline()
    except Exception:
        cmdline = []
    if cmdline and cmdline[0].startswith("ray::"):
        return " ".join(cmdline)[:60].strip()
    name = proc.name()
    if name.startswith("python") and len(cmdline) > 1:
        script = next((a for a in cmdline[1:] if a.endswith(".py")), cmdline[1])
        return f"python {os.path.basename(script)}"
    return name


def cluster_processes():
    import psutil

    me = psutil.Process()
    return [me, *me.children(recursive=True)]


def cpu_seconds(proc) -> float:
    t = proc.cpu_times()
    return t.user + t.system  # not children_*: every descendant has its own row


def sample(window_s: float) -> tuple[list[tuple[str, int, float]], float]:
    """Per-process CPU over ``window_s`` as % of one core: [(name, pid, pct)], total pct."""
    import psutil

    start: dict[int, tuple[psutil.Process, float]] = {}
    for proc in cluster_processes():
        try:
            start[proc.pid] = (proc, cpu_seconds(proc))
        except psutil.Error:
            pass
    t0 = time.monotonic()
    time.sleep(window_s)
    elapsed = time.monotonic() - t0
    rows = []
    seen = set()
    for proc in cluster_processes():
        try:
            now = cpu_seconds(proc)
            name = process_name(proc)
        except psutil.Error:
            continue
        seen.add(proc.pid)
        before = start[proc.pid][1] if proc.pid in start else 0.0  # started in the window: all of it counts
        rows.append((name, proc.pid, 100.0 * (now - before) / elapsed))
    rows.sort(key=lambda r: -r[2])
    return rows, sum(r[2] for r in rows)


def start(home: str, port: int, dashboard: bool, model: bool) -> None:
    import httpx
    import ray
    from ray import serve

    from app.serving.ingress import apply_cluster_env
    from app.settings import load_settings
    from deployments.app import build

    overrides = platform_settings(home)
    # HAProxy's side ports free ones, so that a platform already running on this machine does not collide
    http = load_settings("local", **overrides).http.model_dump(mode="json")
    http["ingress"].update(stats_port=free_port(), metrics_port=free_port(), fallback_http_port=free_port(),
                           fallback_grpc_port=free_port())
    overrides["http"] = http
    _own_dashboard_agent_port(free_port())
    env = apply_cluster_env(load_settings("local", **overrides))
    print("cluster environment:", ", ".join(f"{k}={v}" for k, v in sorted(env.items())), flush=True)
    ray.init(address="local", include_dashboard=dashboard, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"settings": overrides}), name="matih", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    token = (Path(home) / "admin_token").read_text().strip()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        for _ in range(120):
            try:
                if c.get("/ready").json().get("status") == "ok":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(1)
        if model:
            train_iris(home)
            c.post("/v1/endpoints", json={"name": "iris", "target": "iris@champion"}).raise_for_status()
            for _ in range(60):
                if c.post("/v1/endpoints/iris/predict", json=BODY).status_code == 200:
                    break
                time.sleep(1)


def _own_dashboard_agent_port(port: int) -> None:
    """The dashboard agent on its own port (52365 by default, taken by any other local cluster);
    ray.init has no argument for it (tests/integration/conftest.py does the same)."""
    import ray._private.parameter as parameter

    base = parameter.RayParams

    class _RayParams(base):
        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _RayParams


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--window", type=float, default=60.0, help="seconds measured (default 60)")
    p.add_argument("--quiet", type=float, default=30.0, help="seconds waited after start-up (default 30)")
    p.add_argument("--dashboard", action="store_true", help="start the dashboard too, as `serve run` does")
    p.add_argument("--model", action="store_true", help="train iris and serve it, so a model is loaded")
    p.add_argument("--json", metavar="PATH", help="write the table as JSON to PATH")
    args = p.parse_args(argv)

    import ray
    from ray import serve

    home = tempfile.mkdtemp(prefix="matih-idle-")
    try:
        start(home, free_port(), args.dashboard, args.model)
        print(f"deployed; quiet for {args.quiet:g} s, then measuring {args.window:g} s", flush=True)
        time.sleep(args.quiet)
        rows, total = sample(args.window)
        print(f"\n{'process':<62} {'pid':>7} {'% core':>7}")
        for name, pid, pct in rows:
            print(f"{name:<62} {pid:>7} {pct:>7.2f}")
        verdict = "met" if total <= TARGET_PCT else "NOT met"
        print(f"{'total':<62} {'':>7} {total:>7.2f}   (target <= {TARGET_PCT:g}%: {verdict})")
        if args.json:
            Path(args.json).write_text(json.dumps(
                {"window_s": args.window, "dashboard": args.dashboard, "model": args.model, "total_pct": total,
                 "processes": [{"name": n, "pid": pid, "pct": pct} for n, pid, pct in rows]}, indent=2))
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
