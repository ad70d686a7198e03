"""Real servers for tests and benchmarks: an MLflow tracking server on a free port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path

import httpx


def skops_iris_model() -> bytes:
    """A logistic regression on iris, saved with skops: an upload that is checked and converted."""
    import skops.io as sio
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    X, y = load_iris(return_X_y=True)
    return sio.dumps(LogisticRegression(max_iter=300).fit(X, y))


class Clock:
    """A settable clock for code that takes ``clock()`` (an aware datetime)."""

    def __init__(self, t: datetime):
        self.t = t

    def __call__(self) -> datetime:
        return self.t

    def advance(self, seconds: float) -> datetime:
        self.t += timedelta(seconds=seconds)
        return self.t


def wait_until(fn, timeout: float = 120, every: float = 0.3):
    """``fn()``'s first truthy value, polled every ``every`` seconds for at most ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"condition not met in {timeout}s")


def kill_and_time(name: str, ready, timeout: float = 60) -> float:
    """Kill the named detached actor (namespace matih; Ray restarts it) and return seconds until its
    new incarnation (a new process) answers ``ready(handle)``: ``ray.kill`` returns before the old
    one is gone, so a call right after it may still reach the old one."""
    import ray
    from ray.util.state import get_actor

    handle = ray.get_actor(name, namespace="matih")
    actor_id = handle._actor_id.hex()
    before = get_actor(id=actor_id).pid
    ray.kill(handle, no_restart=False)
    started = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            state = get_actor(id=actor_id)
            if state.state == "ALIVE" and state.pid not in (None, 0, before) and ready(handle):
                return time.monotonic() - started
        except Exception:  # restarting: the call fails or times out
            pass
        time.sleep(0.05)
    raise AssertionError(f"actor {name} was not back within {timeout}s")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MlflowServer:
    """A real MLflow tracking server (SQLite backend) that tests may stop and start again."""

    def __init__(self, home: Path, extra_args: list[str] | None = None):
        self.home = home
        self.extra_args = extra_args or []
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> None:
        log = open(self.home / "mlflow-server.log", "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{self.home / 'mlflow-server.db'}",
             "--artifacts-destination", str(self.home / "mlflow-artifacts"), *self.extra_args],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            # MLflow 3's server starts ~10 huey job-consumer processes (GenAI jobs) we never use.
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.uri}/health", timeout=1).status_code == 200:
                    self._warm_up(deadline)
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited; see {self.home / 'mlflow-server.log'}")
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not up after {timeout}s")

    def _warm_up(self, deadline: float) -> None:
        """One registry and one tracking call: the server answers /health before its first
        store call has run (it sets up the database then, which can take seconds on a busy
        machine), and a first caller with a short timeout, such as /ready's probe, would
        otherwise see MLflow as down."""
        for path in ("/api/2.0/mlflow/registered-models/search?max_results=1",
                     "/api/2.0/mlflow/experiments/search?max_results=1"):
            httpx.get(f"{self.uri}{path}", timeout=max(5.0, deadline - time.monotonic()))

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        self.proc = None




class NoJobs:
    """A JobControl for API tests that submit no jobs."""

    async def notify(self) -> None:
        pass

    async def cancel(self, job_id, actor):
        raise AssertionError("no jobs here")


def in_process_context(settings, admin_token: str | None, jobs):
    """The platform's API context with in-process services (no Ray): the real metadata store,
    MLflow registry and ONNX Runtime, and the prediction log in this process (its buffer ships
    to a PredictionLogService); ``jobs`` is the test's JobControl."""
    from app.api.app import ApiContext
    from app.auth import Authenticator
    from app.ensembles.serving import ensemble_dispatch
    from app.predlog.buffer import PredictionLogBuffer
    from app.predlog.control import LocalPredictionLog
    from app.predlog.service import PredictionLogService
    from app.registry.mlflow_registry import ModelRegistry
    from app.serving.loader import LocalPredictor, ModelLoader
    from app.store import MetadataStore

    store = MetadataStore(settings.database_url)
    registry = ModelRegistry(settings)
    predlog = LocalPredictionLog(PredictionLogService(settings))
    loader = ModelLoader(settings, registry, trust=store.get_trust)
    predictor = LocalPredictor(loader)
    return ApiContext(
        settings=settings,
        store=store,
        registry=registry,
        authenticator=Authenticator(settings, store, admin_token),
        predictor=predictor,
        # meta-learners read from MLflow's cached download of the version (kept: no release)
        ensembles=ensemble_dispatch(predictor, settings, fetch=loader.fetch),
        jobs=jobs,
        prediction_buffer=PredictionLogBuffer.from_settings(settings, predlog.write),
        predlog=predlog,
    )


def start_local_ray(num_cpus: int) -> None:
    """A local Ray cluster of this process's own for a unit-test module. Whatever Ray this
    process holds is shut down first: when the whole suite runs in one session, the integration
    tests' cluster is still attached (their session fixture ends last). Ray gives its raylet
    30 s to register, which a busy machine can miss: one more try."""
    import ray

    ray.shutdown()
    for attempt in (1, 2):
        try:
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
            return
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
