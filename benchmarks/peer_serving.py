"""Peer serving (issue 11, part 4): the platform against MLServer and a bare floor, same model, one load generator.

One iris LogisticRegression (scikit-learn's bundled data set, fixed seed) is fitted once in
this process and served, side by side, by:

  (p) the platform   a local Ray cluster started as benchmarks/serving_overhead.py starts it, with the
                     cluster environment of the chosen ingress (``--ingress``, default the profile's
                     ``haproxy``: HAProxy on the HTTP port forwarding to the Gateway replica's own port;
                     ``proxy``: the classic Serve HTTP proxy actor) applied before ``ray.init``. The
                     fitted estimator is registered as a user would: uploaded as a skops file to
                     ``POST /v1/models/iris/versions`` (the registry converts it to ONNX with a parity
                     check), then endpoint ``iris`` is created over REST. Two paths are measured:
                     ``/v1/endpoints/iris/predict`` (REST) and ``/v2/models/iris/infer`` (V2).
  (m) MLServer       ``mlserver start`` with mlserver-sklearn, on the same estimator saved with joblib
                     (``model.joblib``), in a virtual environment of the benchmark's own (not a project
                     dependency), created on first use under ``--peer-venv`` (default
                     ``~/.cache/matih-bench/mlserver``) with ``python -m venv`` + ``pip install``
                     (pinned below: mlserver==1.7.1, mlserver-sklearn==1.7.1, uvloop==0.21.0 (MLServer
                     1.7.1's workers fail on uvloop 0.22+), and the scikit-learn of this environment, so
                     the joblib file loads as it was written). MLServer's
                     ``parallel_workers`` is left at its default, 1 in 1.7.1: one inference worker
                     process behind the HTTP process. Metrics stay on (its default) on a free port.
  (f) the floor      one uvicorn worker running a FastAPI app with ONNX Runtime (intra / inter op
                     threads 1) on the estimator exported by the platform's exporter
                     (app/onnx/sklearn_export.py), in a subprocess: POST /predict.

Before measuring, every server's predictions on the 30 held-out test rows are checked to be
identical. Then one load generator, ``wrk`` (Debian package ``wrk``), drives every target with
keep-alive connections (``wrk -t1 -cN -dS --latency``, a Lua script per target for the POST body
and headers) at concurrency 1, 8 and 32, in interleaved rounds: round k runs every target at
c=1, then every target at c=8, then at c=32 (level-major), so a passing disturbance of the
machine hits all targets at that level alike. Same single-row input everywhere.

Per target and level: p50 and p99 (the median over rounds of wrk's percentiles), req/s (all
requests / all time), and server CPU ms per request: the user+system CPU time (psutil) of that
server's whole process tree during its rounds divided by the requests it served. For the
platform the tree is every descendant process of this driver (raylet, GCS, workers, replicas,
HAProxy) except MLServer's, the floor's and wrk; the driver itself is excluded. Before the
rounds, every tree's idle CPU is measured over a quiet window (``--idle``, default 20 s), in
percent of one core; issue 11 asks for at most 5% for the platform.

Targets (issue 11), platform / MLServer for both platform paths: throughput at c=8 and c=32
>= 1.0, p50 at c=1 <= 1.25, CPU ms per request (all levels pooled) <= 1.5.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/peer_serving.py [--ingress haproxy|proxy]
        [--duration 20] [--rounds 3] [--idle 20] [--json PATH] [--peer-venv DIR]

With the defaults the measurement takes 3 rounds x 3 levels x 4 targets x 20 s = 12 minutes,
plus about 2 minutes to start everything (the first run also installs MLServer). It uses the
whole machine: run it alone.
"""

from __future__ import annotations

import argparse
import json
import os
import platform as _platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROW = [5.1, 3.5, 1.4, 0.2]
SEED = 0
LEVELS = (1, 8, 32)
# uvloop 0.22+ raises in asyncio.get_event_loop() without a running loop, which MLServer 1.7.1's
# inference worker calls at start: the worker dies and `mlserver start` exits; 0.21 works.
PEER_PACKAGES = ("mlserver==1.7.1", "mlserver-sklearn==1.7.1", "uvloop==0.21.0")
DEFAULT_PEER_VENV = Path.home() / ".cache" / "matih-bench" / "mlserver"
WRK = "/usr/bin/wrk"
IDLE_TARGET_PCT = 5.0  # platform idle CPU, percent of one core (issue 11)
BUSY_PCT = 10.0  # other processes' share of all CPUs above which the run is flagged as disturbed
TARGETS = ("platform_rest", "platform_v2", "mlserver", "floor")
LABELS = {
    "platform_rest": "platform REST /v1/endpoints/iris/predict",
    "platform_v2": "platform V2 /v2/models/iris/infer",
    "mlserver": "MLServer V2 /v2/models/iris/infer",
    "floor": "floor FastAPI+ORT /predict",
}
SERVER_OF = {"platform_rest": "platform", "platform_v2": "platform", "mlserver": "mlserver", "floor": "floor"}
# (metric, comparison, bound): platform / MLServer, for each platform path (issue 11)
RATIO_TARGETS = (
    ("throughput_c8", ">=", 1.0),
    ("throughput_c32", ">=", 1.0),
    ("p50_c1", "<=", 1.25),
    ("cpu_ms_per_request", "<=", 1.5),
)

# -- wrk output ---------------------------------------------------------------------------------
_UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


@dataclass
class WrkResult:
    requests: int
    duration_s: float
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]

    @property
    def errors(self) -> int:
        return self.non_2xx + sum(self.socket_errors.values())


def _ms(value: str) -> float:
    m = re.fullmatch(r"([0-9.]+)(us|ms|s|m|h)", value.strip())
    if not m:
        raise ValueError(f"not a wrk duration: {value!r}")
    return float(m.group(1)) * _UNITS_MS[m.group(2)]


def parse_wrk(text: str) -> WrkResult:
    """The figures of one ``wrk --latency`` run (its standard output). Raises ValueError when a
    line it needs is missing (wrk failed, or printed something else)."""
    pct: dict[str, float] = {}
    for m in re.finditer(r"^\s+(50|75|90|99)(?:\.0+)?%\s+(\S+)\s*$", text, re.M):
        pct[m.group(1)] = _ms(m.group(2))
    done = re.search(r"^\s*(\d+) requests in ([0-9.]+)(us|ms|s|m|h)", text, re.M)
    rps = re.search(r"^Requests/sec:\s+([0-9.]+)", text, re.M)
    if not done or not rps or set(pct) != {"50", "75", "90", "99"}:
        raise ValueError(f"unexpected wrk output (no request count, Requests/sec or latency distribution):\n{text}")
    sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, sock.groups()))) if sock else {
        "connect": 0, "read": 0, "write": 0, "timeout": 0}
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        requests=int(done.group(1)),
        duration_s=_ms(done.group(2) + done.group(3)) / 1000.0,
        rps=float(rps.group(1)),
        p50_ms=pct["50"], p75_ms=pct["75"], p90_ms=pct["90"], p99_ms=pct["99"],
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
        socket_errors=socket_errors,
    )


def wrk_lua(body: str, headers: dict[str, str]) -> str:
    """A wrk script that POSTs ``body`` with ``headers`` on every request."""
    if "]==]" in body:
        raise ValueError("the body must not contain ']==]'")
    lines = ['wrk.method = "POST"', f"wrk.body = [==[{body}]==]"]
    for k, v in headers.items():
        lines.append(f'wrk.headers["{k}"] = "{v}"')
    return "\n".join(lines) + "\n"


# -- summaries, ratios, targets ------------------------------------------------------------------
def summarize(runs: list[WrkResult], cpu_s: float) -> dict[str, Any]:
    """One target at one level over its rounds: p50 / p99 the median over rounds, req/s all
    requests over all time, CPU ms per request the server tree's CPU over all requests."""
    requests = sum(r.requests for r in runs)
    seconds = sum(r.duration_s for r in runs)
    return {
        "rounds": len(runs),
        "requests": requests,
        "p50_ms": statistics.median(r.p50_ms for r in runs),
        "p99_ms": statistics.median(r.p99_ms for r in runs),
        "p50_ms_range": [min(r.p50_ms for r in runs), max(r.p50_ms for r in runs)],
        "rps": requests / seconds if seconds else 0.0,
        "rps_range": [min(r.rps for r in runs), max(r.rps for r in runs)],
        "cpu_s": cpu_s,
        "cpu_ms_per_request": 1000.0 * cpu_s / requests if requests else float("nan"),
    }


def pooled_cpu_ms(levels: dict[str, dict[str, Any]]) -> float:
    """CPU ms per request of a target over all its levels together."""
    requests = sum(v["requests"] for v in levels.values())
    return 1000.0 * sum(v["cpu_s"] for v in levels.values()) / requests if requests else float("nan")


def ratios(results: dict[str, dict[str, dict[str, Any]]], peer: str = "mlserver",
           platforms: tuple[str, ...] = ("platform_rest", "platform_v2")) -> dict[str, dict[str, float]]:
    """platform / peer for each platform path: throughput at c=8 and c=32, p50 at c=1, CPU ms
    per request (all levels pooled)."""
    ref = results[peer]
    out: dict[str, dict[str, float]] = {}
    for name in platforms:
        r = results[name]
        out[name] = {
            "throughput_c8": r["c8"]["rps"] / ref["c8"]["rps"],
            "throughput_c32": r["c32"]["rps"] / ref["c32"]["rps"],
            "p50_c1": r["c1"]["p50_ms"] / ref["c1"]["p50_ms"],
            "cpu_ms_per_request": pooled_cpu_ms(r) / pooled_cpu_ms(ref),
        }
    return out


def targets_met(rat: dict[str, dict[str, float]]) -> dict[str, dict[str, bool]]:
    """MET / NOT MET per platform path and metric against RATIO_TARGETS."""
    out: dict[str, dict[str, bool]] = {}
    for name, values in rat.items():
        out[name] = {}
        for metric, op, bound in RATIO_TARGETS:
            v = values[metric]
            out[name][metric] = v >= bound if op == ">=" else v <= bound
    return out


# -- process trees and CPU ----------------------------------------------------------------------
def group_of(pid: int, parent: dict[int, int], roots: dict[int, str | None], limit: int = 128) -> str | None:
    """The group of ``pid``: the value of the nearest ancestor (itself included) found in
    ``roots`` (None there: excluded, like wrk or the driver), None when no ancestor is a root."""
    p, hops = pid, 0
    while p > 0 and hops < limit:
        if p in roots:
            return roots[p]
        p, hops = parent.get(p, 0), hops + 1
    return None


def cpu_delta(before: dict[tuple[int, float], tuple[str, float]],
              after: dict[tuple[int, float], tuple[str, float]]) -> dict[str, float]:
    """CPU seconds each group used between two snapshots ({(pid, create_time): (group, cpu_s)}):
    a process in both counts its difference, a new one all of its time. A process that ended in
    between is not counted (its last interval is lost: worker churn, rare here)."""
    used: dict[str, float] = {}
    for key, (group, cpu) in after.items():
        prev = before.get(key)
        used[group] = used.get(group, 0.0) + max(0.0, cpu - (prev[1] if prev else 0.0))
    return used


class Trees:
    """CPU snapshots of the server process trees: ``platform`` (every descendant of this driver
    not under a peer), and one group per peer subprocess."""

    def __init__(self) -> None:
        self.driver = os.getpid()
        self.peers: dict[int, str] = {}

    def snapshot(self, exclude: tuple[int, ...] = ()) -> dict[tuple[int, float], tuple[str, float]]:
        import psutil

        procs: dict[int, tuple[int, float, float]] = {}
        for p in psutil.process_iter(["ppid", "create_time", "cpu_times"]):
            info = p.info
            if info["cpu_times"] is None or info["ppid"] is None:
                continue
            t = info["cpu_times"]
            procs[p.pid] = (info["ppid"], info["create_time"], t.user + t.system)
        parent = {pid: v[0] for pid, v in procs.items()}
        roots: dict[int, str | None] = {self.driver: "platform", **self.peers, **dict.fromkeys(exclude)}
        snap = {}
        for pid, (_ppid, created, cpu) in procs.items():
            if pid == self.driver:
                continue
            group = group_of(pid, parent, roots)
            if group is not None:
                snap[(pid, created)] = (group, cpu)
        return snap

    def members(self) -> dict[str, list[str]]:
        """Process names per group, for the report."""
        import psutil

        out: dict[str, list[str]] = {}
        snap = self.snapshot()
        for pid, _created in snap:
            try:
                name = psutil.Process(pid).name()
            except psutil.Error:
                continue
            out.setdefault(snap[(pid, _created)][0], []).append(name)
        return {k: sorted(v) for k, v in out.items()}


class MachineWatch:
    """CPU the rest of the machine used: all busy CPU time (/proc/stat) minus this driver's whole
    tree (itself, the servers, wrk)."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK")
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float]:
        import psutil

        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
        busy = (user + nice + system + irq + softirq) / self.hz
        own = 0.0
        me = psutil.Process()
        for p in [me, *me.children(recursive=True)]:
            try:
                t = p.cpu_times()
                own += t.user + t.system
            except psutil.Error:
                pass
        return time.monotonic(), busy, own

    def report(self) -> dict[str, float]:
        t1, busy1, own1 = self._snap()
        t0, busy0, own0 = self.start
        capacity = (t1 - t0) * (os.cpu_count() or 1)
        other = max(0.0, (busy1 - busy0) - (own1 - own0))
        return {"other_processes_cpu_pct": round(100 * other / capacity, 1),
                "this_benchmark_cpu_pct": round(100 * (own1 - own0) / capacity, 1)}


# -- helpers ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(log: Path | None, lines: int = 40) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log else ""
    except OSError:
        return ""


def wait_http(url: str, proc: subprocess.Popen | None, timeout_s: float, what: str, log: Path | None = None) -> None:
    """Poll GET ``url`` until 200 (bounded); fail when ``proc`` exits first (with its log's tail)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before it was ready:\n{_tail(log)}")
        try:
            r = httpx.get(url, timeout=2)
            if r.status_code == 200:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise RuntimeError(f"{what} was not ready at {url} within {timeout_s:.0f}s: {last}\n{_tail(log)}")


def stop(proc: subprocess.Popen | None, name: str) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop in 15 s: killing it", flush=True)
        proc.kill()
        proc.wait(timeout=10)


def kill_tree(proc: subprocess.Popen | None, name: str) -> None:
    """Stop ``proc`` and every process under it (MLServer's inference workers)."""
    if proc is None:
        return
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    stop(proc, name)
    for c in children:
        try:
            c.kill()
        except psutil.Error:
            pass


def commit() -> str | None:
    repo = Path(__file__).resolve().parent.parent
    try:
        def git(*cmd: str) -> str:
            return subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10,
                                  check=False).stdout.strip()

        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        return f"{head}{' (uncommitted changes)' if dirty else ''}" if head else None
    except (OSError, subprocess.SubprocessError):
        return None


# -- the model ----------------------------------------------------------------------------------
def fit_iris():
    """(estimator, test rows): LogisticRegression on a stratified 80/20 split, fixed seed."""
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    X, y = load_iris(return_X_y=True)
    X_train, X_test, y_train, _ = train_test_split(X, y, test_size=0.2, random_state=SEED, stratify=y)
    est = LogisticRegression(max_iter=1000, random_state=SEED).fit(X_train, y_train)
    return est, X_test


# -- MLServer -----------------------------------------------------------------------------------
def peer_venv(venv: Path, packages: list[str]) -> Path:
    """The MLServer environment: created and installed on first use (pip's progress shown),
    reinstalled when the wanted packages change. Returns its ``mlserver`` executable."""
    marker = venv / "matih-bench-packages.txt"
    wanted = "\n".join(packages)
    exe = venv / "bin" / "mlserver"
    if exe.exists() and marker.exists() and marker.read_text() == wanted:
        return exe
    print(f"MLServer environment: creating {venv} and installing {' '.join(packages)}", flush=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    if not (venv / "bin" / "python").exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--progress-bar", "on", *packages],
                   check=True, timeout=1800)
    marker.write_text(wanted)
    return exe


def peer_parallel_workers(venv: Path) -> int:
    """MLServer's default ``parallel_workers`` in that environment."""
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "from mlserver.settings import Settings; print(Settings().parallel_workers)"],
                         capture_output=True, text=True, timeout=120, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def start_mlserver(exe: Path, est, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    import joblib

    model_dir = workdir / "mlserver" / "iris"
    model_dir.mkdir(parents=True)
    joblib.dump(est, model_dir / "model.joblib")
    (model_dir / "model-settings.json").write_text(json.dumps({
        "name": "iris", "implementation": "mlserver_sklearn.SKLearnModel",
        "parameters": {"uri": "./model.joblib", "version": "v1"},
    }))
    port = free_port()
    settings = {"host": "127.0.0.1", "http_port": port, "grpc_port": free_port(), "metrics_port": free_port()}
    (workdir / "mlserver" / "settings.json").write_text(json.dumps(settings))
    log = (workdir / "mlserver.log").open("w")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PYTHONPATH", "VIRTUAL_ENV"))}
    proc = subprocess.Popen([str(exe), "start", str(workdir / "mlserver")], stdout=log, stderr=subprocess.STDOUT,
                            env=env, cwd=workdir)
    return proc, port, workdir / "mlserver.log"


# -- the floor ----------------------------------------------------------------------------------
FLOOR_APP = '''
import json, os
import numpy as np
import onnxruntime as ort
from fastapi import FastAPI, Request, Response

opts = ort.SessionOptions()
opts.intra_op_num_threads = 1
opts.inter_op_num_threads = 1
session = ort.InferenceSession(os.environ["FLOOR_MODEL"], sess_options=opts, providers=["CPUExecutionProvider"])
input_name = session.get_inputs()[0].name
label = session.get_outputs()[0].name
app = FastAPI()


@app.post("/predict")
async def predict(request: Request) -> Response:
    x = np.asarray(json.loads(await request.body())["instances"], dtype=np.float32)
    preds = session.run([label], {input_name: x})[0]
    return Response(json.dumps({"predictions": preds.tolist()}), media_type="application/json")


@app.get("/health")
async def health() -> dict:
    return {}
'''


def start_floor(est, X_sample, workdir: Path) -> tuple[subprocess.Popen, int, Path]:
    from app.onnx.sklearn_export import to_onnx

    model = to_onnx(est, X_sample, is_classifier=True)
    (workdir / "floor.onnx").write_bytes(model.SerializeToString())
    (workdir / "floor_app.py").write_text(FLOOR_APP)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["FLOOR_MODEL"] = str(workdir / "floor.onnx")
    log = (workdir / "floor.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "floor_app:app", "--host", "127.0.0.1",
                             "--port", str(port), "--workers", "1", "--no-access-log", "--log-level", "warning"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    return proc, port, workdir / "floor.log"


# -- the platform -------------------------------------------------------------------------------
def platform_overrides(home: str, ingress: str) -> dict[str, Any]:
    """Settings overrides: the local profile, the chosen ingress with free side ports, one fixed
    ModelServer replica (autoscaling off, as benchmarks/serving_overhead.py)."""
    from app.settings import load_settings

    base = load_settings("local", matih_home=home)
    http = base.http.model_dump(mode="json")
    http["ingress"] = {**http["ingress"], "mode": ingress, "stats_port": free_port(), "metrics_port": free_port(),
                       "fallback_http_port": free_port(), "fallback_grpc_port": free_port()}
    serving = base.serving.model_dump(mode="json")
    serving.update({"autoscaling": None, "model_server_replicas": 1})
    return {"matih_home": home, "http": http, "serving": serving}


def stop_platform() -> None:
    """Serve and Ray down, whatever state a run left them in (every platform benchmark's end)."""
    import ray
    from ray import serve

    if ray.is_initialized():
        try:
            serve.shutdown()
        finally:
            ray.shutdown()


def start_platform(home: str, overrides: dict[str, Any], est) -> tuple[str, str]:
    """Serve the platform on a free port, register ``est`` (skops upload), create endpoint iris;
    returns (base_url, admin token)."""
    import httpx
    import skops.io
    from ray import serve

    from app.settings import load_settings
    from deployments.app import build

    port = free_port()
    timeout_s = load_settings("local", **overrides).http.request_timeout_s
    serve.start(http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": timeout_s})
    t0 = time.perf_counter()
    serve.run(build({"settings": overrides}), name="matih", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    wait_http(f"{base}/v2/health/live", None, 120, "the platform")
    print(f"platform deployed in {time.perf_counter() - t0:.1f}s on {base}", flush=True)
    token = (Path(home) / "admin_token").read_text().strip()
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=120) as c:
        r = c.post("/v1/models/iris/versions", files={"file": ("iris.skops", skops.io.dumps(est))},
                   data={"format": "skops"})
        if r.status_code != 201:
            raise RuntimeError(f"registering the model failed: {r.status_code} {r.text[:500]}")
        version = r.json()["version"]
        r = c.post("/v1/endpoints", json={"name": "iris", "target": f"iris/{version}"})
        if r.status_code != 201:
            raise RuntimeError(f"creating the endpoint failed: {r.status_code} {r.text[:500]}")
        for _ in range(60):  # the first predict loads the model into the ModelServer replica
            r = c.post("/v1/endpoints/iris/predict", json={"instances": [ROW]})
            if r.status_code == 200:
                break
            time.sleep(1)
        r.raise_for_status()
    print(f"model registered as iris/{version} (skops upload), endpoint iris serving", flush=True)
    return base, token


# -- bodies and prediction checks ---------------------------------------------------------------
def v2_body(rows: list[list[float]]) -> dict[str, Any]:
    return {"inputs": [{"name": "input-0", "shape": [len(rows), len(rows[0])], "datatype": "FP64",
                        "data": [v for row in rows for v in row]}]}


def v2_labels(body: dict[str, Any]) -> list[int]:
    outs = body["outputs"]
    out = next((o for o in outs if o["name"].lower().startswith(("label", "predict"))), outs[0])
    return [int(v) for v in out["data"]]


def check_predictions(urls: dict[str, str], headers: dict[str, dict[str, str]], rows: list[list[float]],
                      expected: list[int]) -> None:
    import httpx

    got: dict[str, list[int]] = {}
    for key, url in urls.items():
        v2 = key in ("platform_v2", "mlserver")
        r = httpx.post(url, json=v2_body(rows) if v2 else {"instances": rows}, headers=headers.get(key, {}),
                       timeout=60)
        if r.status_code != 200:
            raise RuntimeError(f"{LABELS[key]}: {r.status_code} {r.text[:500]}")
        got[key] = v2_labels(r.json()) if v2 else [int(v) for v in r.json()["predictions"]]
    bad = {k: v for k, v in got.items() if v != expected}
    if bad:
        raise RuntimeError(f"predictions differ from scikit-learn's {expected}: {bad}")
    print(f"all four targets predict scikit-learn's labels on the {len(rows)} test rows", flush=True)


# -- running wrk --------------------------------------------------------------------------------
def run_wrk(url: str, script: Path, concurrency: int, duration_s: float, on_start=None) -> tuple[WrkResult, str]:
    args = [WRK, "-t1", f"-c{concurrency}", f"-d{duration_s:g}s", "--latency", "--timeout", "10s", "-s",
            str(script), url]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if on_start:
        on_start(proc.pid)
    try:
        out, err = proc.communicate(timeout=duration_s + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise RuntimeError(f"wrk did not finish within {duration_s + 60:.0f}s: {' '.join(args)}") from None
    if proc.returncode != 0:
        raise RuntimeError(f"wrk exited with {proc.returncode}: {err.strip()}\n{out}")
    return parse_wrk(out), out


def machine_info() -> dict[str, Any]:
    cpu = _platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu_model": cpu, "logical_cpus": os.cpu_count(), "load_avg": [round(x, 2) for x in os.getloadavg()],
            "os": _platform.platform(), "python": _platform.python_version()}


# -- report -------------------------------------------------------------------------------------
def print_table(results: dict[str, dict[str, dict[str, Any]]]) -> None:
    head = (f"{'target':<42}{'c':>4}{'requests':>10}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>9}"
            f"{'CPU ms/req':>12}")
    print(head)
    print("-" * len(head))
    for c in LEVELS:
        for key in TARGETS:
            r = results[key][f"c{c}"]
            print(f"{LABELS[key]:<42}{c:>4}{r['requests']:>10}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}"
                  f"{r['rps']:>9.0f}{r['cpu_ms_per_request']:>12.2f}")
    print(f"{'CPU ms per request, all levels pooled:':<42}"
          + "  ".join(f"{k} {pooled_cpu_ms(results[k]):.2f}" for k in TARGETS))


def markdown_table(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    lines = ["| target | c=1 p50 ms | c=1 p99 ms | c=1 req/s | c=8 p50 ms | c=8 p99 ms | c=8 req/s | c=32 p50 ms "
             "| c=32 p99 ms | c=32 req/s | CPU ms / request (c=1 / 8 / 32; pooled) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for key in TARGETS:
        r = results[key]
        cells = []
        for c in LEVELS:
            x = r[f"c{c}"]
            cells += [f"{x['p50_ms']:.2f}", f"{x['p99_ms']:.2f}", f"{x['rps']:.0f}"]
        cpu = " / ".join(f"{r[f'c{c}']['cpu_ms_per_request']:.2f}" for c in LEVELS)
        cells.append(f"{cpu}; {pooled_cpu_ms(r):.2f}")
        lines.append(f"| {LABELS[key]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                   help="the platform's ingress mode (http.ingress.mode; default haproxy, the profile's)")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per target, level and round (default 20)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--idle", type=float, default=20.0, help="quiet window for idle CPU, seconds (default 20)")
    p.add_argument("--warmup", type=float, default=3.0, help="warm-up seconds per target at c=8 (default 3)")
    p.add_argument("--peer-venv", type=Path, default=DEFAULT_PEER_VENV,
                   help=f"MLServer's virtual environment (default {DEFAULT_PEER_VENV})")
    p.add_argument("--peer-packages", default=" ".join(PEER_PACKAGES),
                   help="pip requirements of MLServer's environment (default %(default)r; this environment's\n"
                        "scikit-learn version is added)")
    p.add_argument("--json", metavar="PATH", help="write everything as JSON to PATH")
    args = p.parse_args(argv)
    if args.duration < 1 or args.rounds < 1 or args.idle < 1:
        p.error("--duration, --rounds and --idle must be at least 1")
    if not Path(WRK).exists() and not shutil.which("wrk"):
        print("wrk is not installed: `sudo apt-get install wrk` (Debian / Ubuntu package wrk)", file=sys.stderr)
        return 2
    wrk_exe = WRK if Path(WRK).exists() else shutil.which("wrk")
    globals()["WRK"] = wrk_exe

    import sklearn

    started = time.perf_counter()
    mach = machine_info()
    print(f"machine: {mach['cpu_model']}, {mach['logical_cpus']} logical CPUs, load average "
          f"{' '.join(map(str, mach['load_avg']))}; code {commit()}", flush=True)
    if mach["load_avg"][0] > 0.5 * (mach["logical_cpus"] or 1):
        print(f"WARNING: the machine is busy before the start (1-minute load {mach['load_avg'][0]})", flush=True)

    packages = [*args.peer_packages.split(), f"scikit-learn=={sklearn.__version__}"]
    exe = peer_venv(args.peer_venv.expanduser(), packages)
    workers = peer_parallel_workers(args.peer_venv.expanduser())
    print(f"MLServer: {' '.join(packages)} in {args.peer_venv}; parallel_workers {workers} (its default)", flush=True)

    est, X_test = fit_iris()
    rows = X_test.tolist()
    expected = [int(v) for v in est.predict(X_test)]

    home = tempfile.mkdtemp(prefix="matih-peer-")
    workdir = Path(tempfile.mkdtemp(prefix="matih-peer-servers-"))
    os.environ["MATIH_HOME"] = home
    from app.serving.ingress import apply_cluster_env, mode_in_effect
    from app.settings import load_settings

    overrides = platform_overrides(home, args.ingress)
    env = apply_cluster_env(load_settings("local", **overrides))
    if mode_in_effect() != args.ingress:
        raise SystemExit(f"the environment selects ingress {mode_in_effect()!r}, not {args.ingress!r}: "
                         f"unset {', '.join(env)}")
    print(f"platform ingress: {args.ingress} ({' '.join(f'{k}={v}' for k, v in env.items())})", flush=True)

    import ray

    trees = Trees()
    mlserver = floor = None
    try:
        mlserver, ml_port, ml_log = start_mlserver(exe, est, workdir)
        trees.peers[mlserver.pid] = "mlserver"
        floor, floor_port, floor_log = start_floor(est, X_test, workdir)
        trees.peers[floor.pid] = "floor"
        ray.init(address="local", include_dashboard=False, log_to_driver=False)
        base, token = start_platform(home, overrides, est)
        wait_http(f"http://127.0.0.1:{ml_port}/v2/models/iris/ready", mlserver, 180, "MLServer", ml_log)
        wait_http(f"http://127.0.0.1:{floor_port}/health", floor, 60, "the floor", floor_log)
        print(f"MLServer on :{ml_port}, floor on :{floor_port}", flush=True)

        urls = {"platform_rest": f"{base}/v1/endpoints/iris/predict", "platform_v2": f"{base}/v2/models/iris/infer",
                "mlserver": f"http://127.0.0.1:{ml_port}/v2/models/iris/infer",
                "floor": f"http://127.0.0.1:{floor_port}/predict"}
        auth = {"Authorization": f"Bearer {token}"}
        headers = {"platform_rest": auth, "platform_v2": auth}
        check_predictions(urls, headers, rows, expected)

        scripts = {}
        for key in TARGETS:
            body = json.dumps(v2_body([ROW]) if key in ("platform_v2", "mlserver") else {"instances": [ROW]})
            scripts[key] = workdir / f"{key}.lua"
            scripts[key].write_text(wrk_lua(body, {"Content-Type": "application/json", **headers.get(key, {})}))

        members = trees.members()
        print("server process trees: " + "; ".join(f"{g}: {len(v)} processes ({', '.join(sorted(set(v)))})"
                                                   for g, v in sorted(members.items())), flush=True)

        print(f"idle: {args.idle:g} s with no traffic", flush=True)
        before, t0 = trees.snapshot(), time.monotonic()
        time.sleep(args.idle)
        used, wall = cpu_delta(before, trees.snapshot()), time.monotonic() - t0
        idle_pct = {g: 100.0 * used.get(g, 0.0) / wall for g in ("platform", "mlserver", "floor")}
        print("idle CPU, percent of one core: " + ", ".join(f"{g} {v:.1f}%" for g, v in idle_pct.items())
              + f" (platform target <= {IDLE_TARGET_PCT:g}%: "
              + ("MET" if idle_pct["platform"] <= IDLE_TARGET_PCT else "NOT MET") + ")", flush=True)

        for key in TARGETS:  # warm-up: caches, JIT-less Python paths, connection pools
            w, _ = run_wrk(urls[key], scripts[key], 8, args.warmup)
            if w.errors:
                raise RuntimeError(f"{LABELS[key]}: {w.errors} errors in the warm-up: {w}")

        print(f"measuring: {args.rounds} rounds x levels {LEVELS} x {len(TARGETS)} targets x {args.duration:g} s, "
              "level-major within each round", flush=True)
        runs: dict[tuple[str, int], list[WrkResult]] = {(k, c): [] for k in TARGETS for c in LEVELS}
        cpu: dict[tuple[str, int], float] = {(k, c): 0.0 for k in TARGETS for c in LEVELS}
        raw: list[dict[str, Any]] = []
        watch = MachineWatch()
        for rnd in range(args.rounds):
            for c in LEVELS:
                for key in TARGETS:
                    wrk_pid: list[int] = []
                    before = trees.snapshot()
                    res, text = run_wrk(urls[key], scripts[key], c, args.duration, on_start=wrk_pid.append)
                    used = cpu_delta(before, trees.snapshot(exclude=tuple(wrk_pid)))
                    if res.errors:
                        raise RuntimeError(f"{LABELS[key]} at c={c}, round {rnd + 1}: {res.non_2xx} non-2xx "
                                           f"responses, socket errors {res.socket_errors}\n{text}")
                    server_cpu = used.get(SERVER_OF[key], 0.0)
                    runs[(key, c)].append(res)
                    cpu[(key, c)] += server_cpu
                    raw.append({"round": rnd + 1, "target": key, "concurrency": c, **asdict(res),
                                "server_cpu_s": server_cpu})
                    print(f"  round {rnd + 1} c={c:<2} {LABELS[key]:<42} p50 {res.p50_ms:7.2f} ms  p99 "
                          f"{res.p99_ms:7.2f} ms  {res.rps:7.0f} req/s  CPU {1000 * server_cpu / res.requests:6.2f} "
                          "ms/req", flush=True)
        background = watch.report()

        results = {k: {f"c{c}": summarize(runs[(k, c)], cpu[(k, c)]) for c in LEVELS} for k in TARGETS}
        rat = ratios(results)
        met = targets_met(rat)
        print()
        print_table(results)
        print()
        print("platform / MLServer (issue 11 targets):")
        for name, values in rat.items():
            for metric, op, bound in RATIO_TARGETS:
                print(f"  {LABELS[name]:<42} {metric:<20} {values[metric]:6.2f}  (target {op} {bound:g}) "
                      f"{'MET' if met[name][metric] else 'NOT MET'}")
        print(f"  idle CPU of the platform {idle_pct['platform']:.1f}% of a core (target <= {IDLE_TARGET_PCT:g}%) "
              f"{'MET' if idle_pct['platform'] <= IDLE_TARGET_PCT else 'NOT MET'}")
        disturbed = background["other_processes_cpu_pct"] > BUSY_PCT
        print(f"\nCPU while measuring (share of all {os.cpu_count()} CPUs): this benchmark "
              f"{background['this_benchmark_cpu_pct']}%, other processes {background['other_processes_cpu_pct']}%")
        if disturbed:
            print(f"WARNING: other processes used over {BUSY_PCT:g}% of the CPUs while measuring: the machine was "
                  "busy with other work, the numbers are disturbed; run again when it is quiet")
        print("\n" + markdown_table(results))
        total = time.perf_counter() - started
        print(f"\ntotal run time {total:.0f}s", flush=True)
        if args.json:
            doc = {
                "benchmark": "peer_serving",
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "commit": commit(),
                "machine": {**mach, "load_avg_end": [round(x, 2) for x in os.getloadavg()]},
                "config": {"ingress": args.ingress, "cluster_env": env, "duration_s": args.duration,
                           "rounds": args.rounds, "levels": list(LEVELS), "idle_s": args.idle, "row": ROW,
                           "order": "level-major within each round", "peer_packages": packages,
                           "mlserver_parallel_workers": workers, "model": "iris LogisticRegression, seed 0"},
                "labels": LABELS,
                "process_trees": members,
                "idle_cpu_pct_of_one_core": idle_pct,
                "results": results,
                "ratios_platform_over_mlserver": rat,
                "targets": {"bounds": [list(t) for t in RATIO_TARGETS], "met": met,
                            "idle_platform_met": idle_pct["platform"] <= IDLE_TARGET_PCT},
                "background_cpu": {**background, "disturbed": disturbed},
                "runs": raw,
                "total_s": total,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"results written to {args.json}")
    finally:
        try:
            stop_platform()
        finally:
            kill_tree(mlserver, "MLServer")
            kill_tree(floor, "the floor")
            shutil.rmtree(home, ignore_errors=True)
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
