"""Serving overhead: one ONNX model behind three paths, measured side by side in one run.

  (a) in-process  onnxruntime.InferenceSession.run on a 1-row float32 input, with the
                  session options of app/runtimes/onnx.py (1 intra-op, 1 inter-op thread);
  (b) bare Serve  a single Ray Serve deployment ("bare" application, route /bare,
                  num_cpus 0.25) that loads the same .onnx file and answers
                  POST {"instances": [[...]]} -> {"predictions": [...]};
  (c) platform    POST /v1/endpoints/iris/predict with the bearer token: HTTP proxy ->
                  Gateway (FastAPI: auth, endpoint + alias resolution, validation) ->
                  ModelServer (multiplexed model, payload checks, ONNX Runtime).

The script starts a local Ray cluster and the platform in a temporary MATIH_HOME, trains
the iris logistic regression with the platform's trainer (the README's first training job,
run in-process: training jobs are Ray Jobs, which need the dashboard this cluster runs
without), creates the endpoint, takes the registered .onnx file from the registry for (a) and (b), then runs
every path at concurrency 1 and 8 with a fixed number of requests. The paths are
interleaved in rounds (a, b, c, a, b, c, ...) so that a passing disturbance on the
machine hits all of them rather than one. It prints p50/p99 latency and throughput, the
ratios (c)/(b) and (c)/(a), and whether the target (c)/(b) p50 <= 1.5 is met.

    .venv/bin/python benchmarks/serving_overhead.py [--requests 300] [--json results.json]

Every loop is bounded by a count; this part takes 40-60 s on 2 vCPUs. It also reports how
much CPU other processes used while it measured, and flags the run as disturbed above 10%.

The extended part (issue 3; --skip-extended leaves it out, about 4 minutes) runs at
concurrency 16 on one ModelServer replica holding at most 3 models: 10 models multiplexed
against one, and @serve.batch on against off for iris and for a recurrent model (seq_onnx),
over HTTP and straight to the ModelServer through a DeploymentHandle. Target: batched /
unbatched throughput >= 2x.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from app.cli import DEMO_JOB

ROW = [5.1, 3.5, 1.4, 0.2]
BODY = {"instances": [ROW]}
TARGET_RATIO = 1.5
EXT_MODELS = 10
EXT_PER_REPLICA = 3
EXT_CONCURRENCY = 16
BATCH_TARGET = 2.0
SEQ_STEPS = 6000  # the default --seq-steps: about 30 ms a call on one core, at 1 row or 16
SEQ_WIDTH = 64
LEVELS = (1, 8)
PATHS = ("a", "b", "c")
LABELS = {
    "a": "(a) in-process ONNX Runtime",
    "b": "(b) bare Ray Serve deployment",
    "c": "(c) platform /v1/endpoints/iris/predict",
}
TRAINING_JOB = DEMO_JOB  # the README's first job, one definition in app/cli.py


# -- the model ------------------------------------------------------------------------------
def onnx_session(path: str | bytes):
    """An InferenceSession with the options OnnxModelRuntime.load uses (serving defaults)."""
    import onnxruntime as ort

    from app.runtimes.onnx import available_providers, session_options

    return ort.InferenceSession(path, sess_options=session_options(1, 1), providers=available_providers())


def label_output(session) -> str:
    names = [o.name for o in session.get_outputs()]
    return next((n for n in names if n.lower().startswith("label")), names[0])


def bare_deployment():
    """The bare Serve deployment of (b), defined here so that nothing of the platform is in
    its path: Starlette request -> numpy -> ONNX Runtime -> dict (Serve writes the JSON)."""
    from ray import serve

    from app.settings import load_settings

    # The same Serve tuning as the platform's replicas (settings.serving.serve_env), so the
    # comparison measures what the platform adds, not a different Serve configuration.
    env = {"env_vars": dict(load_settings("local", matih_home=tempfile.gettempdir()).serving.serve_env)}

    @serve.deployment(name="BareOnnx", ray_actor_options={"num_cpus": 0.25, "runtime_env": env},
                      max_ongoing_requests=32)
    class BareOnnx:
        def __init__(self, onnx_bytes: bytes):
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = 1
            opts.inter_op_num_threads = 1
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            opts.log_severity_level = 3
            self.session = ort.InferenceSession(onnx_bytes, sess_options=opts, providers=["CPUExecutionProvider"])
            self.input = self.session.get_inputs()[0].name
            names = [o.name for o in self.session.get_outputs()]
            self.label = next((n for n in names if n.lower().startswith("label")), names[0])

        async def __call__(self, request) -> dict:
            body = await request.json()
            x = np.asarray(body["instances"], dtype=np.float32)
            preds = self.session.run([self.label], {self.input: x})[0]
            return {"predictions": preds.tolist()}

    return BareOnnx


def seq_onnx(steps: int, width: int = SEQ_WIDTH) -> bytes:
    """A recurrent model on the four iris features, built directly as an ONNX graph with random
    weights (its accuracy does not matter here): the features are projected to ``width``
    units, then ``h = tanh(h @ W + b)`` runs ``steps`` times in an ONNX ``Loop``, then
    ``Softmax`` -> ``probabilities`` and ``ArgMax`` -> ``label``, the outputs skl2onnx gives a
    classifier. It stands for sequence models (recurrent nets, step-by-step decoders): the
    steps run one after the other, each costs ONNX Runtime a few microseconds whatever the
    rows, so a call on 16 rows costs little more than a call on one. The case @serve.batch is
    for. Its weights fit in the CPU caches, unlike a wide MLP whose weight reads at batch 1
    take the memory bandwidth that the HTTP path on the other core needs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {
        "w_in": (rng.standard_normal((len(ROW), width)) / 2).astype(np.float32),
        "w": (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32),
        "b": np.zeros(width, np.float32),
        "w_out": (rng.standard_normal((width, 3)) / np.sqrt(width)).astype(np.float32),
        "steps": np.array(steps, np.int64),
        "cond": np.array(True),
    }
    value = helper.make_tensor_value_info
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["a"]),
         helper.make_node("Tanh", ["a"], ["h_out"]), helper.make_node("Identity", ["cond_in"], ["cond_out"])],
        "step",
        [value("i", TensorProto.INT64, []), value("cond_in", TensorProto.BOOL, []), value("h_in", TensorProto.FLOAT, None)],
        [value("cond_out", TensorProto.BOOL, []), value("h_out", TensorProto.FLOAT, None)],
    )
    nodes = [helper.make_node("MatMul", ["input", "w_in"], ["h0"]),
             helper.make_node("Loop", ["steps", "cond", "h0"], ["h"], body=body),
             helper.make_node("MatMul", ["h", "w_out"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
             helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0)]
    graph = helper.make_graph(
        nodes, "recurrent", [value("input", TensorProto.FLOAT, [None, len(ROW)])],
        [value("label", TensorProto.INT64, [None]), value("probabilities", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(a, name) for name, a in arrays.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model.SerializeToString()


def call_ms(onnx_bytes: bytes, rows: int, repeats: int = 50) -> float:
    """Median in-process ONNX Runtime time of one call on ``rows`` rows (serving options)."""
    session = onnx_session(onnx_bytes)
    name, label = session.get_inputs()[0].name, label_output(session)
    x = np.asarray([ROW] * rows, dtype=np.float32)
    for _ in range(5):
        session.run([label], {name: x})
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        session.run([label], {name: x})
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1000.0


# -- load generation --------------------------------------------------------------------------
class Target:
    """A path under test: ``callers(k)`` gives k independent call functions (one per thread,
    kept across rounds so HTTP connections stay open)."""

    def __init__(self, key: str, make_caller: Callable[[], Callable[[], None]]):
        self.key = key
        self.make_caller = make_caller
        self._callers: list[Callable[[], None]] = []

    def callers(self, k: int) -> list[Callable[[], None]]:
        while len(self._callers) < k:
            self._callers.append(self.make_caller())
        return self._callers[:k]


def run_level(target: Target, concurrency: int, n: int) -> tuple[list[float], float]:
    """n calls split over `concurrency` threads; returns (latencies in s, wall time in s)."""
    per_thread = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    callers = target.callers(concurrency)
    results: list[list[float]] = [[] for _ in range(concurrency)]
    errors: list[BaseException] = []
    start = threading.Barrier(concurrency + 1)

    def work(i: int) -> None:
        call, out = callers[i], results[i]
        start.wait()
        try:
            for _ in range(per_thread[i]):
                t0 = time.perf_counter()
                call()
                out.append(time.perf_counter() - t0)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"path {target.key} failed at concurrency {concurrency}: {errors[0]}") from errors[0]
    return [x for r in results for x in r], wall


def http_caller(url: str, headers: dict[str, str]) -> Callable[[], Callable[[], None]]:
    import requests

    def make() -> Callable[[], None]:
        session = requests.Session()
        session.headers.update(headers)

        def call() -> None:
            r = session.post(url, json=BODY, timeout=30)
            if r.status_code != 200:
                raise RuntimeError(f"POST {url} -> {r.status_code}: {r.text[:300]}")
            r.content  # noqa: B018 - read the whole body

        return call

    return make


def summarize(lat: list[float], wall: float) -> dict[str, Any]:
    ms = np.asarray(lat) * 1000.0
    return {
        "requests": len(lat),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "throughput_rps": len(lat) / wall if wall > 0 else math.inf,
        "wall_s": wall,
    }


def measure(targets: dict[str, Target], counts: dict[int, int], rounds: int, warmup: int) -> dict[str, Any]:
    results: dict[str, dict[str, Any]] = {k: {} for k in targets}
    for c in LEVELS:
        n = counts[c]
        for t in targets.values():  # warm-up: opens every connection of this level, fills caches
            run_level(t, c, max(warmup, c))
        lat: dict[str, list[float]] = {k: [] for k in targets}
        wall: dict[str, float] = {k: 0.0 for k in targets}
        chunks = [n // rounds + (1 if i < n % rounds else 0) for i in range(rounds)]
        for chunk in chunks:
            for key, t in targets.items():
                got, w = run_level(t, c, chunk)
                lat[key] += got
                wall[key] += w
        for key in targets:
            results[key][f"c{c}"] = summarize(lat[key], wall[key])
        print(f"  concurrency {c}: done", flush=True)
    return results


# -- was the machine quiet? -------------------------------------------------------------------
class CpuWatch:
    """CPU time the rest of the machine used while we measured: all busy CPU time (/proc/stat)
    minus this process tree's (the driver, the Ray cluster it started, its replicas). On a
    2-vCPU machine another job's tests or servers shift every number; this says when."""

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._snapshot()

    @staticmethod
    def _system() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
        return user + nice + system + irq + softirq, steal

    @staticmethod
    def _own_tree() -> int:
        parent: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                rest = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            pid = int(entry.name)
            parent[pid] = int(rest[1])
            ticks[pid] = sum(int(x) for x in rest[11:15])  # utime stime cutime cstime
        me, total = os.getpid(), 0
        for pid, used in ticks.items():
            p, hops = pid, 0
            while p > 1 and p != me and hops < 64:
                p, hops = parent.get(p, 0), hops + 1
            if p == me:
                total += used
        return total

    def _snapshot(self) -> tuple[float, int, int, int]:
        busy, steal = self._system()
        return time.monotonic(), busy, steal, self._own_tree()

    def report(self) -> dict[str, Any] | None:
        try:
            t1, busy1, steal1, own1 = self._snapshot()
        except (OSError, ValueError):
            return None
        t0, busy0, steal0, own0 = self.start
        capacity = (t1 - t0) * self.hz * (os.cpu_count() or 1)
        if capacity <= 0:
            return None
        other = max(0, (busy1 - busy0) - (own1 - own0))
        return {
            "other_processes_cpu_pct": round(100 * other / capacity, 1),
            "this_benchmark_cpu_pct": round(100 * (own1 - own0) / capacity, 1),
            "steal_pct": round(100 * (steal1 - steal0) / capacity, 1),
        }


QUIET_PCT = 10.0  # other processes' share of all CPUs above which the run is flagged as disturbed


# -- the platform -----------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_iris(home: str) -> None:
    """The README's first training job (TRAINING_JOB), run in this process by the platform's
    trainer into the platform's MLflow: training jobs are Ray Jobs, which need the Ray dashboard,
    and this benchmark's cluster runs without it (it measures serving, not training)."""
    from app.settings import load_settings
    from app.training.pipeline import train_sklearn
    from app.training.spec import TrainingJobSpec

    settings = load_settings("local", matih_home=home)
    train_sklearn(TrainingJobSpec.model_validate(TRAINING_JOB), settings, "bench-train-iris", lambda *a, **k: None)


def start_platform(home: str, port: int) -> tuple[str, str]:
    """Serve the platform on 127.0.0.1:port, train iris, create the endpoint; returns
    (base_url, admin token)."""
    import httpx
    from ray import serve

    from deployments.app import build

    serve.start(http_options={"host": "127.0.0.1", "port": port})
    t0 = time.perf_counter()
    serve.run(build({"settings": platform_settings(home)}), name="matih", route_prefix="/")
    print(f"platform deployed in {time.perf_counter() - t0:.1f}s", flush=True)
    token = (Path(home) / "admin_token").read_text().strip()
    base = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    train_iris(home)
    print(f"iris trained and registered in {time.perf_counter() - t0:.1f}s", flush=True)
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        r = c.post("/v1/endpoints", json={"name": "iris", "target": "iris@champion"})
        r.raise_for_status()
        for _ in range(60):  # first predict loads the model into the ModelServer replica
            r = c.post("/v1/endpoints/iris/predict", json=BODY)
            if r.status_code == 200:
                break
            time.sleep(1)
        r.raise_for_status()
    return base, token


def platform_settings(home: str, **serving: Any) -> dict[str, Any]:
    """Builder settings: the local profile with one fixed ModelServer replica (autoscaling off,
    so no replica count changes mid-measurement) holding at most 3 models, as the extended
    measurement asks; ``serving`` overrides more keys of the serving section."""
    from app.settings import load_settings

    section = load_settings("local", matih_home=home).serving.model_dump()
    section.update({"autoscaling": None, "model_server_replicas": 1, "max_models_per_replica": EXT_PER_REPLICA})
    section.update(serving)
    return {"matih_home": home, "serving": section}


def rotating_caller(urls: list[str], headers: dict[str, str]) -> Callable[[], Callable[[], None]]:
    """Like http_caller, but each client cycles through ``urls`` (one endpoint per model),
    starting at a different one, so every replica sees a mix of models."""
    import itertools

    import requests

    starts = itertools.count()

    def make() -> Callable[[], None]:
        session = requests.Session()
        session.headers.update(headers)
        first = next(starts)
        cycle = itertools.cycle(urls[first % len(urls):] + urls[: first % len(urls)])

        def call() -> None:
            url = next(cycle)
            r = session.post(url, json=BODY, timeout=60)
            if r.status_code != 200:
                raise RuntimeError(f"POST {url} -> {r.status_code}: {r.text[:300]}")

        return call

    return make


def model_server_stats() -> dict[str, int]:
    """The ModelServer replica's request and model-call counts (one replica in this run)."""
    from ray import serve

    return serve.get_deployment_handle("ModelServer", app_name="matih").stats.remote().result()


def handle_load(model_id: str, n: int, concurrency: int) -> float:
    """``n`` predict calls straight to the ModelServer through a DeploymentHandle (no HTTP proxy,
    no Gateway), ``concurrency`` at a time; returns the wall time. It shows what batching does
    in the replica itself, apart from the HTTP and Gateway work every request also costs."""
    import asyncio

    from ray import serve

    handle = serve.get_deployment_handle("ModelServer", app_name="matih").options(multiplexed_model_id=model_id)

    async def run() -> float:
        sem = asyncio.Semaphore(concurrency)

        async def one() -> None:
            async with sem:
                out = await handle.predict.remote(BODY)
                if isinstance(out, BaseException):  # a caller's error comes back as a value
                    raise out

        t0 = time.perf_counter()
        await asyncio.gather(*[one() for _ in range(n)])
        return time.perf_counter() - t0

    return asyncio.run(run())


def extended(base: str, token: str, onnx_bytes: bytes, home: str, n: int, rounds: int,
             seq_steps: int) -> dict[str, Any]:
    """Issue 3's extension: 10 models multiplexed 3 per replica, and @serve.batch vs unbatched
    throughput at concurrency 16 for two models (iris, and a recurrent model), each side by side."""
    import httpx
    from ray import serve

    from deployments.app import build

    headers = {"Authorization": f"Bearer {token}"}
    seq_bytes = seq_onnx(seq_steps)
    seq_file = Path(home) / "artifacts" / "bench" / "seq.onnx"  # inside the artifact root: register by source
    seq_file.parent.mkdir(parents=True, exist_ok=True)
    seq_file.write_bytes(seq_bytes)
    with httpx.Client(base_url=base, headers=headers, timeout=120) as c:
        for i in range(EXT_MODELS):  # ten registered models, each its own endpoint
            r = c.post(f"/v1/models/bench-m{i}/versions", files={"file": ("model.onnx", onnx_bytes)},
                       data={"format": "onnx"})
            if r.status_code != 201:
                raise RuntimeError(f"registering bench-m{i} failed: {r.status_code} {r.text[:300]}")
            version = r.json()["version"]
            c.post("/v1/endpoints", json={"name": f"bench-m{i}", "target": f"bench-m{i}/{version}"}).raise_for_status()
        r = c.post("/v1/models/bench-seq/versions", json={"source": str(seq_file), "format": "onnx"})
        if r.status_code != 201:
            raise RuntimeError(f"registering bench-seq failed: {r.status_code} {r.text[:300]}")
        seq_id = f"bench-seq/{r.json()['version']}"
        c.post("/v1/endpoints", json={"name": "seq", "target": seq_id}).raise_for_status()

    single = Target("single", http_caller(f"{base}/v1/endpoints/iris/predict", headers))
    multi = Target("multi", rotating_caller([f"{base}/v1/endpoints/bench-m{i}/predict" for i in range(EXT_MODELS)],
                                            headers))
    seq = Target("seq", http_caller(f"{base}/v1/endpoints/seq/predict", headers))
    c16 = EXT_CONCURRENCY
    print(f"\nextended: {EXT_MODELS} models at {EXT_PER_REPLICA} per replica vs one model, c={c16}", flush=True)
    lat: dict[str, list[float]] = {"single": [], "multi": []}
    wall = {"single": 0.0, "multi": 0.0}
    for t in (single, multi):
        run_level(t, c16, c16 * 4)
    for _ in range(rounds):
        for key, t in (("single", single), ("multi", multi)):
            got, w = run_level(t, c16, n // rounds)
            lat[key] += got
            wall[key] += w
    mux = {k: summarize(lat[k], wall[k]) for k in lat}

    costs = {"iris": {b: call_ms(onnx_bytes, b) for b in (1, c16)},
             "seq": {b: call_ms(seq_bytes, b) for b in (1, c16)}}
    print(f"extended: in-process ONNX Runtime per call, batch 1 / {c16} rows: "
          + "; ".join(f"{k} {v[1]:.3f} / {v[c16]:.3f} ms" for k, v in costs.items())
          + f" (seq: {seq_steps} recurrent steps of width {SEQ_WIDTH})", flush=True)
    print(f"extended: @serve.batch on vs off, c={c16}, iris and seq (the ModelServer is redeployed per mode)",
          flush=True)
    models = {"iris": single, "seq": seq}
    blat = {(m, k): [] for m in models for k in ("on", "off")}
    bwall = {key: 0.0 for key in blat}
    counts = {key: {"requests": 0, "model_calls": 0, "batched_requests": 0, "in_flight_sum": 0} for key in blat}
    direct = {key: {"requests": 0, "model_calls": 0, "wall_s": 0.0} for key in blat}
    from app.registry.mlflow_registry import ModelRegistry
    from app.settings import load_settings

    model_ids = {"iris": ModelRegistry(load_settings(None, matih_home=home)).resolve("iris@champion").model_id,
                 "seq": seq_id}
    for _ in range(2):
        for mode in ("on", "off"):
            serve.run(build({"settings": platform_settings(home, batching=mode == "on")}),
                      name="matih", route_prefix="/")
            for m, target in models.items():
                run_level(target, c16, c16 * 8)  # warm-up: loads the model into the new replica
                before = model_server_stats()
                got, w = run_level(target, c16, n // 2)
                after = model_server_stats()
                blat[(m, mode)] += got
                bwall[(m, mode)] += w
                for k in counts[(m, mode)]:
                    counts[(m, mode)][k] += after[k] - before[k]
                before = model_server_stats()
                direct[(m, mode)]["wall_s"] += handle_load(model_ids[m], n // 2, c16)
                after = model_server_stats()
                for k in ("requests", "model_calls"):
                    direct[(m, mode)][k] += after[k] - before[k]
    batch = {f"{m}_{mode}": {**summarize(blat[(m, mode)], bwall[(m, mode)]), **counts[(m, mode)],
                             "requests_per_model_call": counts[(m, mode)]["requests"]
                             / max(1, counts[(m, mode)]["model_calls"]),
                             "in_flight_on_arrival": counts[(m, mode)]["in_flight_sum"]
                             / max(1, counts[(m, mode)]["requests"])}
             for (m, mode) in blat}
    for (m, mode), d in direct.items():
        d["throughput_rps"] = d["requests"] / d["wall_s"] if d["wall_s"] else 0.0
        d["requests_per_model_call"] = d["requests"] / max(1, d["model_calls"])
    return {
        "concurrency": c16,
        "multiplex": mux,
        "multiplex_throughput_ratio": mux["multi"]["throughput_rps"] / mux["single"]["throughput_rps"],
        "batching": batch,
        "call_ms": {m: {str(b): v for b, v in c.items()} for m, c in costs.items()},
        "seq_steps": seq_steps,
        "seq_width": SEQ_WIDTH,
        "batching_throughput_ratio": {m: batch[f"{m}_on"]["throughput_rps"] / batch[f"{m}_off"]["throughput_rps"]
                                      for m in models},
        "direct": {f"{m}_{mode}": d for (m, mode), d in direct.items()},
        "direct_batching_throughput_ratio": {
            m: direct[(m, "on")]["throughput_rps"] / max(1e-9, direct[(m, "off")]["throughput_rps"]) for m in models
        },
    }


def print_extended(ext: dict[str, Any]) -> None:
    c16 = ext["concurrency"]
    print(f"\n{'extended (c=' + str(c16) + ')':<44}{'requests':>9}{'p50 ms':>10}{'p99 ms':>10}{'req/s':>10}"
          f"{'req/call':>10}{'in replica':>11}")
    rows = [("one model (iris)", ext["multiplex"]["single"]),
            (f"{EXT_MODELS} models, {EXT_PER_REPLICA} per replica", ext["multiplex"]["multi"])]
    for m in ("iris", "seq"):
        for mode in ("on", "off"):
            rows.append((f"{m}, @serve.batch {mode}", ext["batching"][f"{m}_{mode}"]))
    for label, r in rows:
        per_call = f"{r['requests_per_model_call']:>10.1f}" if "requests_per_model_call" in r else f"{'':>10}"
        seen = f"{r['in_flight_on_arrival']:>11.1f}" if "in_flight_on_arrival" in r else ""
        print(f"{label:<44}{r['requests']:>9}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}{r['throughput_rps']:>10.1f}"
              f"{per_call}{seen}")
    print("  (req/call: requests per ONNX Runtime call in the ModelServer; in replica: predict calls a request\n"
          "   found in the ModelServer on arrival, itself included, on average)")
    print(f"  throughput {EXT_MODELS} models / one model = {ext['multiplex_throughput_ratio']:.2f}")
    for m in ("iris", "seq"):
        on, off = ext["direct"][f"{m}_on"], ext["direct"][f"{m}_off"]
        print(f"  ModelServer alone (DeploymentHandle, no HTTP), {m}: batched {on['throughput_rps']:.1f} req/s "
              f"({on['requests_per_model_call']:.1f} req/call), unbatched {off['throughput_rps']:.1f} req/s: "
              f"{ext['direct_batching_throughput_ratio'][m]:.2f}x")
    ratios = ext["batching_throughput_ratio"]
    calls = ext["call_ms"]
    print(f"  throughput batched / unbatched: iris {ratios['iris']:.2f} (a {calls['iris']['1']:.3f} ms model: "
          "request handling, not inference, is the cost), "
          f"seq {ratios['seq']:.2f} (target >= {BATCH_TARGET:.1f}: {'MET' if ratios['seq'] >= BATCH_TARGET else 'NOT MET'}"
          f"; {calls['seq']['1']:.2f} ms per call at batch 1, {calls['seq'][str(c16)]:.2f} ms at {c16})")


def registered_onnx(home: str) -> Path:
    """The .onnx file of iris@champion, from the registry (the file the ModelServer loads)."""
    from app.registry.mlflow_registry import ModelRegistry
    from app.runtimes.onnx import find_onnx_file
    from app.settings import load_settings

    settings = load_settings(None, matih_home=home)
    registry = ModelRegistry(settings)
    resolved = registry.resolve("iris@champion")
    path = find_onnx_file(registry.download(resolved))
    print(f"model: {resolved.model_id} ({path.name}, {path.stat().st_size} bytes)", flush=True)
    return path


def platform_config(home: str) -> dict[str, Any]:
    """The serving settings the platform ran with, and the code's commit."""
    import subprocess

    serving = json.loads(json.dumps(platform_settings(home)["serving"], default=str))
    repo = Path(__file__).resolve().parent.parent
    commit = None
    try:
        def git(*cmd: str) -> str:
            done = subprocess.run(["git", *cmd], cwd=repo, capture_output=True, text=True, timeout=10, check=False)
            return done.stdout.strip()

        head, dirty = git("rev-parse", "--short", "HEAD"), git("status", "--porcelain", "--untracked-files=no")
        commit = f"{head}{' (uncommitted changes)' if dirty else ''}" if head else None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": commit, "serving": serving}


# -- report -----------------------------------------------------------------------------------
def machine() -> dict[str, Any]:
    import onnxruntime
    import ray

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_gib = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    from app.runtimes.onnx import gpu_present

    return {
        "cpu_model": cpu,
        "logical_cpus": os.cpu_count(),
        "memory_gib": mem_gib,
        "gpu": gpu_present(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "ray": ray.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for c in LEVELS:
        a, b, cc = (results[k][f"c{c}"] for k in PATHS)
        out[f"c_over_b_p50_c{c}"] = cc["p50_ms"] / b["p50_ms"]
        out[f"c_over_a_p50_c{c}"] = cc["p50_ms"] / a["p50_ms"]
        out[f"c_over_b_throughput_c{c}"] = cc["throughput_rps"] / b["throughput_rps"]
        out[f"c_over_a_throughput_c{c}"] = cc["throughput_rps"] / a["throughput_rps"]
    return out


def print_report(results: dict[str, dict[str, Any]], rat: dict[str, float], target_met: dict[str, bool]) -> None:
    print()
    head = f"{'path':<42} {'conc':>4} {'requests':>8} {'p50 ms':>9} {'p99 ms':>9} {'req/s':>9}"
    print(head)
    print("-" * len(head))
    for c in LEVELS:
        for k in PATHS:
            r = results[k][f"c{c}"]
            print(
                f"{LABELS[k]:<42} {c:>4} {r['requests']:>8} {r['p50_ms']:>9.3f} {r['p99_ms']:>9.3f}"
                f" {r['throughput_rps']:>9.1f}"
            )
    print()
    print("ratios (platform vs the others; latency: higher is slower, throughput: lower is slower)")
    for c in LEVELS:
        print(
            f"  c={c}: p50 (c)/(b) = {rat[f'c_over_b_p50_c{c}']:.2f}   p50 (c)/(a) = {rat[f'c_over_a_p50_c{c}']:.1f}"
            f"   throughput (c)/(b) = {rat[f'c_over_b_throughput_c{c}']:.2f}"
            f"   throughput (c)/(a) = {rat[f'c_over_a_throughput_c{c}']:.4f}"
        )
    print()
    for c in LEVELS:
        v = rat[f"c_over_b_p50_c{c}"]
        print(f"target (c)/(b) p50 <= {TARGET_RATIO} at c={c}: {v:.2f} -> {'MET' if target_met[f'c{c}'] else 'NOT MET'}")
    print(f"target overall (both levels): {'MET' if all(target_met.values()) else 'NOT MET'}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=300, metavar="N",
                   help="requests per path at concurrency 1 (default 300); concurrency 8 runs\n"
                        "N*8/3 rounded up to a multiple of 8 (800 for 300)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up requests per path and level (default 50)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per level (default 4)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--keep-home", action="store_true", help="keep the temporary MATIH_HOME")
    p.add_argument("--skip-extended", action="store_true",
                   help="skip the extended part (10 models multiplexed 3 per replica; batched vs\n"
                        "unbatched throughput at concurrency 16)")
    p.add_argument("--seq-steps", type=int, default=SEQ_STEPS, metavar="N",
                   help="recurrent steps of the extended part's sequence model (default %(default)s)")
    args = p.parse_args(argv)
    if args.requests < 8 or args.rounds < 1:
        p.error("--requests must be at least 8 and --rounds at least 1")
    counts = {1: args.requests, 8: int(math.ceil(args.requests * 8 / 3 / 8) * 8)}

    home = tempfile.mkdtemp(prefix="matih-bench-")
    os.environ["MATIH_HOME"] = home  # inherited by the local Ray cluster's workers
    import ray
    from ray import serve

    started = time.perf_counter()
    # address="local": always a private cluster, never one that RAY_ADDRESS or `ray start` points
    # at (serve.shutdown() below must not touch anybody else's applications); replica access
    # logs stay in the session's log files instead of being printed by this (load-generating) process.
    ray.init(address="local", include_dashboard=False, log_to_driver=False)
    try:
        port = free_port()
        base, token = start_platform(home, port)
        onnx_path = registered_onnx(home)
        config = platform_config(home)
        sv = config["serving"]
        print(f"code: {config['commit']}; ModelServer: batching={sv.get('batching')} "
              f"batch_wait_s={sv.get('batch_wait_s')} replicas={sv.get('model_server_replicas')} "
              f"autoscaling={sv.get('autoscaling')} models/replica={sv.get('max_models_per_replica')} "
              f"handle_grpc={sv.get('handle_grpc')}", flush=True)

        serve.run(bare_deployment().bind(onnx_path.read_bytes()), name="bare", route_prefix="/bare")

        session = onnx_session(str(onnx_path))
        input_name, label = session.get_inputs()[0].name, label_output(session)
        x = np.asarray([ROW], dtype=np.float32)

        def make_inproc() -> Callable[[], None]:
            def call() -> None:
                session.run([label], {input_name: x})

            return call

        import requests

        expected = session.run([label], {input_name: x})[0].tolist()
        got_b = requests.post(f"{base}/bare", json=BODY, timeout=30).json()["predictions"]
        got_c = requests.post(f"{base}/v1/endpoints/iris/predict", json=BODY, timeout=30,
                              headers={"Authorization": f"Bearer {token}"}).json()["predictions"]
        if not (expected == got_b == got_c):
            raise RuntimeError(f"the paths disagree: (a) {expected}, (b) {got_b}, (c) {got_c}")
        print(f"all three paths predict {expected} for {ROW}", flush=True)

        targets = {
            "a": Target("a", make_inproc),
            "b": Target("b", http_caller(f"{base}/bare", {})),
            "c": Target("c", http_caller(f"{base}/v1/endpoints/iris/predict", {"Authorization": f"Bearer {token}"})),
        }
        print(f"measuring: {counts[1]} requests at c=1, {counts[8]} at c=8 per path, "
              f"{args.rounds} interleaved rounds, {args.warmup} warm-up", flush=True)
        watch = CpuWatch() if Path("/proc/stat").exists() else None
        results = measure(targets, counts, args.rounds, args.warmup)
        background = watch.report() if watch else None
        rat = ratios(results)
        target_met = {f"c{c}": rat[f"c_over_b_p50_c{c}"] <= TARGET_RATIO for c in LEVELS}
        print_report(results, rat, target_met)
        if background is not None:
            disturbed = background["other_processes_cpu_pct"] > QUIET_PCT
            background["disturbed"] = disturbed
            print(f"\nCPU while measuring (share of all {os.cpu_count()} CPUs): this benchmark "
                  f"{background['this_benchmark_cpu_pct']}%, other processes {background['other_processes_cpu_pct']}%"
                  f", steal {background['steal_pct']}%")
            if disturbed:
                print(f"WARNING: other processes used over {QUIET_PCT:.0f}% of the CPUs while measuring; "
                      "the numbers are disturbed (the platform's extra hop suffers most): run again when quiet")
        ext = None
        if not args.skip_extended:
            ext = extended(base, token, onnx_path.read_bytes(), home, args.requests * 4, args.rounds, args.seq_steps)
            print_extended(ext)
        total = time.perf_counter() - started
        print(f"\ntotal run time {total:.0f}s", flush=True)
        if args.json:
            doc = {
                "benchmark": "serving_overhead",
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "machine": machine(),
                "platform": config,
                "config": {"requests": counts, "warmup": args.warmup, "rounds": args.rounds,
                           "row": ROW, "model": "iris@champion (LogisticRegression, ONNX)"},
                "paths": LABELS,
                "results": results,
                "ratios": rat,
                "background_cpu": background,
                "target": {"metric": "(c)/(b) p50 latency", "max": TARGET_RATIO, "met": target_met,
                           "met_overall": all(target_met.values())},
                "extended": ext,
                "total_s": total,
            }
            Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
            print(f"results written to {args.json}")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            if not args.keep_home:
                shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
