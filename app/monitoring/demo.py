"""``matih-ml demo loop``: the closed loop end to end on a running platform, over its HTTP API
only, printing each step with its time since the start:

deploy a model -> send traffic (with labels as feedback) -> a monitor run finds no drift ->
shift the inputs (and the concept behind the labels) -> drift -> alert -> retraining trigger
-> training job -> gates -> challenger -> canary rollout (traffic keeps flowing) -> promotion.

The data is generated here (no download): four features, of which x0 and x1 move by 1.5
standard deviations when the demo shifts them, and a label that follows ``x0 + x1 > t`` with
``t`` moving from 0 to 3 with them, so the champion's accuracy falls to about a half and a
model retrained on the new traffic wins its gate. The integration test runs the same function
with a faster cadence (``LoopCadence``)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

__all__ = ["LoopCadence", "run_loop_demo", "free_name", "DEMO_ENDPOINT", "DEMO_MODEL"]

DEMO_ENDPOINT = "loop-demo"
DEMO_MODEL = "loop-demo"
FEATURES = ["x0", "x1", "x2", "x3"]
_TERMINAL = ("promoted", "rolled_back", "gated", "failed", "skipped")


@dataclass
class LoopCadence:
    """How fast the demo moves (the integration test uses a faster one)."""

    train_rows: int = 2000
    # Windows of 500 rows: the normalized Wasserstein distance of a same-distribution sample of
    # n rows is about 1/sqrt(n) of its threshold's scale (0.1 at n = 150, 0.05 at 500), so
    # smaller windows would report drift on unchanged traffic.
    baseline_requests: int = 100
    shifted_requests: int = 120
    rows_per_request: int = 5
    window_rows: int = 500
    schedule_s: float = 60.0
    bake_s: float = 5.0
    min_samples: int = 20
    steps: tuple[float, ...] = (50.0, 100.0)
    traffic_rps: float = 25.0
    timeout_s: float = 600.0


def _data(rng: np.random.Generator, n: int, shifted: bool) -> tuple[np.ndarray, np.ndarray]:
    X = rng.normal(size=(n, len(FEATURES)))
    if shifted:
        X[:, 0] += 1.5
        X[:, 1] += 1.5
    threshold = 3.0 if shifted else 0.0
    y = ((X[:, 0] + X[:, 1] + 0.3 * rng.normal(size=n)) > threshold).astype(int)
    return X.round(4), y


class _Clock:
    def __init__(self, say: Callable[[str], None]):
        self.start = time.monotonic()
        self.say = say
        self.steps: list[tuple[str, float]] = []

    def step(self, text: str) -> None:
        at = time.monotonic() - self.start
        self.steps.append((text, at))
        self.say(f"[{at:6.1f}s] {text}")

    def note(self, text: str) -> None:
        self.say(f"          {text}")


def _wait(what: str, fn: Callable[[], Any], timeout_s: float, every: float = 1.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise SystemExit(f"demo: {what} did not happen within {timeout_s:.0f}s")


def _send(client, name: str, X: np.ndarray, y: np.ndarray, rows_per_request: int) -> int:
    """Predict ``X`` in requests of ``rows_per_request`` rows and send each row's label as
    feedback; returns the requests sent."""
    feedback: list[dict[str, Any]] = []
    sent = 0
    for start in range(0, len(X), rows_per_request):
        rows = X[start:start + rows_per_request]
        out = client.call("POST", f"/v1/endpoints/{name}/predict", {"instances": rows.tolist()})
        sent += 1
        for i in range(len(rows)):
            feedback.append({"request_id": out["request_id"], "instance": i, "label": int(y[start + i])})
        if len(feedback) >= 500:
            client.call("POST", f"/v1/endpoints/{name}/feedback", feedback)
            feedback = []
    if feedback:
        client.call("POST", f"/v1/endpoints/{name}/feedback", feedback)
    return sent


def _run_monitor(client, name: str, timeout_s: float) -> dict[str, Any]:
    run = client.call("POST", f"/v1/monitors/{name}/run")
    job = client.wait_job(run["job_id"], timeout_s=timeout_s)
    if job["status"] != "succeeded":
        raise SystemExit(f"demo: the monitor run's job {job['status']}: {job.get('error')}")
    return client.call("GET", f"/v1/monitors/{name}/runs/{run['run_id']}")


def run_loop_demo(client, data_dir: Path, *, say: Callable[[str], None] = print,
                  cadence: LoopCadence | None = None, seed: int = 7,
                  alert_channels: list[dict[str, Any]] | None = None, name: str = DEMO_ENDPOINT) -> dict[str, Any]:
    """Run the loop demo against the platform ``client`` talks to (``app.cli.Client``);
    ``data_dir`` is a folder under the platform's data roots for the training set;
    ``alert_channels`` replace the default ones (events, Prometheus). Returns the steps with
    their times and the final trigger. ``name`` is the endpoint's and the model's (``free_name``
    gives one not used yet, so the demo can run again on the same platform)."""
    import pandas as pd

    c = cadence or LoopCadence()
    rng = np.random.default_rng(seed)
    clock = _Clock(say)
    _wait("the platform getting ready", lambda: client.http.get("/ready").status_code == 200, c.timeout_s, 2.0)
    clock.step("platform ready")

    data_dir.mkdir(parents=True, exist_ok=True)
    X, y = _data(rng, c.train_rows, shifted=False)
    train = data_dir / "train.parquet"
    pd.DataFrame({**{f: X[:, i] for i, f in enumerate(FEATURES)}, "label": y}).to_parquet(train, index=False)
    job_spec = {
        "name": "loop-demo-logreg", "framework": "sklearn", "estimator": "sklearn.linear_model.LogisticRegression",
        "hyperparameters": {"max_iter": 500}, "dataset": {"uri": str(train), "target": "label"},
        "register_as": name,
        "validation": {"gates": [{"metric": "accuracy", "beat_champion_by": 0.02}]},
    }
    job = client.call("POST", "/v1/training/jobs", job_spec)
    done = client.wait_job(job["job_id"], timeout_s=c.timeout_s)
    if done["status"] != "succeeded":
        raise SystemExit(f"demo: training the first model {done['status']}: {done.get('error')}")
    version = done["result"]["model_version"]
    clock.step(f"trained {name} v{version} on {c.train_rows} rows "
               f"(holdout accuracy {done['result']['metrics']['accuracy']:.3f}); reference profile stored")

    if client.http.get(f"/v1/endpoints/{name}").status_code == 404:
        # the log keeps each prediction's probabilities, which CBPE estimates accuracy from
        client.call("POST", "/v1/endpoints", {"name": name, "target": f"{name}@champion",
                                              "spec": {"logging": {"probabilities": True}}})
    clock.step(f"endpoint {name} -> {name}@champion")

    monitor = {
        "window": {"rows": c.window_rows}, "schedule": {"every_s": c.schedule_s},
        "alerts": {"rules": [{"when": "drift.dataset", "severity": "warning"},
                             {"when": "performance.accuracy < 0.85", "severity": "critical"}],
                   **({"channels": alert_channels} if alert_channels else {})},
        "retraining": {
            "policies": [{"kind": "drift"}], "cooldown_s": 0, "max_concurrent": 1,
            "data": {"window_days": 1, "include_training_set": False, "min_rows": 100},
            "rollout": {"steps": list(c.steps), "bake_s": c.bake_s, "min_samples": c.min_samples},
        },
    }
    client.call("PUT", f"/v1/monitors/{name}", monitor)
    clock.step(f"monitor on {name}: window {c.window_rows} rows, every {c.schedule_s:g}s, alert on dataset "
               "drift and accuracy < 0.85, retrain on drift, canary " + "/".join(f"{s:g}%" for s in c.steps))

    Xb, yb = _data(rng, c.baseline_requests * c.rows_per_request, shifted=False)
    _send(client, name, Xb, yb, c.rows_per_request)
    clock.step(f"sent {c.baseline_requests} requests like the training data, labels as feedback")
    run = _run_monitor(client, name, c.timeout_s)
    dd = run["dataset_drift"] or {}
    clock.step(f"monitor run: dataset drift {dd.get('detected')} (share {dd.get('share', 0):.2f}); accuracy "
               f"{((run.get('performance') or {}).get('overall') or {}).get('accuracy', {}).get('value')}")

    Xs, ys = _data(rng, c.shifted_requests * c.rows_per_request, shifted=True)
    _send(client, name, Xs, ys, c.rows_per_request)
    clock.step(f"shifted x0 and x1 by +1.5 sd (and the label's threshold with them); sent {c.shifted_requests} requests")

    stop = threading.Event()

    def traffic() -> None:  # the canary needs requests on both arms while it is judged
        while not stop.is_set():
            Xt, yt = _data(rng, c.rows_per_request, shifted=True)
            try:
                _send(client, name, Xt, yt, c.rows_per_request)
            except SystemExit:
                pass
            stop.wait(1.0 / c.traffic_rps)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        run = _run_monitor(client, name, c.timeout_s)
        dd = run["dataset_drift"] or {}
        drifted = [n for n, r in ((run.get("drift") or {}).get("columns") or {}).items() if r.get("drifted")]
        clock.step(f"drift detected: {dd.get('detected')} (share {dd.get('share', 0):.2f}; columns {drifted})")
        alerts = client.call("GET", f"/v1/alerts?endpoint={name}&status=firing")["items"]
        for a in alerts:
            clock.step(f"alert {a['rule']} ({a['severity']}): {a['message']}")
        if dd.get("detected") is not True:
            raise SystemExit("demo: the shifted window shows no dataset drift; nothing to retrain on")
        drift_run = run["id"]

        def ours() -> dict[str, Any] | None:  # the trigger of this run's drift policy
            items = client.call("GET", f"/v1/monitors/{name}/loop")["items"]
            return next((t for t in items if t.get("run_id") == drift_run), None)

        trigger = _wait("a retraining trigger", ours, c.timeout_s)
        seen: set[str] = set()

        def progress() -> dict[str, Any] | None:
            nonlocal trigger
            trigger = client.call("GET", f"/v1/monitors/{name}/loop")["items"]
            trigger = next(t for t in trigger if t["id"] == ours_id)
            for step in trigger.get("steps") or []:
                key = f"{step['step']}@{step['at']}"
                if key not in seen:
                    seen.add(key)
                    clock.step(f"loop: {step['step']} {_detail(step.get('detail'))}")
            return trigger if trigger["status"] in _TERMINAL else None

        ours_id = trigger["id"]
        _wait("the loop's end", progress, c.timeout_s)
    finally:
        stop.set()
        sender.join(timeout=10)
    champion = client.call("GET", f"/v1/models/{name}")
    clock.step(f"loop ended: {trigger['status']}; {name} aliases now {champion.get('aliases')}")
    return {"steps": clock.steps, "trigger": trigger, "seconds": time.monotonic() - clock.start}


def free_name(client, base: str = DEMO_ENDPOINT) -> str:
    """``base``, or ``base-2``, ``base-3``, ...: the first name no endpoint or model has yet."""
    for i in range(1, 1000):
        name = base if i == 1 else f"{base}-{i}"
        if client.http.get(f"/v1/endpoints/{name}").status_code == 404 and \
                client.http.get(f"/v1/models/{name}").status_code == 404:
            return name
    raise SystemExit(f"demo: no free name like {base!r}")


def _detail(detail: Any) -> str:
    if not isinstance(detail, dict) or not detail:
        return ""
    keep = {k: v for k, v in detail.items() if not isinstance(v, (dict, list)) or k in ("gates", "failures")}
    return "(" + ", ".join(f"{k}={v}" for k, v in list(keep.items())[:6]) + ")"
