"""One Ray cluster and one Serve application for the whole integration session, over HTTP
(and the Open Inference Protocol over gRPC, on a port of its own)."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from app.cli import DEMO_JOB
from tests.support import MlflowServer, free_port

REDIS_URL = os.environ.get("MATIH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IRIS_JOB = DEMO_JOB  # the README's first job, one definition in app/cli.py


@dataclass
class Platform:
    url: str
    home: Path
    admin_token: str
    settings: object
    mlflow: MlflowServer
    s3: object = None  # tests.s3server.S3Server: the S3-compatible server the platform's S3 settings name
    dashboard: str = ""  # the Ray dashboard (job submission API)
    grpc: str = ""  # host:port of Serve's gRPC proxy (inference.GRPCInferenceService)
    kafka: object = None  # tests.kafka.TansuBroker: the Kafka-protocol broker the event relay publishes to
    metrics: str = ""  # host:port of Ray's Prometheus endpoint on this node (matih_* and ray_serve_*)

    def client(self, token: str | None = "admin") -> httpx.Client:
        token = self.admin_token if token == "admin" else token
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def wait_job(self, job_id: str, timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        with self.client() as c:
            while time.monotonic() < deadline:
                job = c.get(f"/v1/jobs/{job_id}").json()
                if job["status"] in ("succeeded", "failed", "cancelled"):
                    return job
                time.sleep(0.3)
        raise AssertionError(f"job {job_id} did not finish in {timeout}s: {job}")


def _own_dashboard_agent_port(port: int) -> None:
    """Give this cluster's dashboard agent its own port. It takes 52365 by default, so with a
    second Ray cluster on the machine (a `make run` beside `make test`) it cannot start, and
    the cluster refuses Ray Jobs ("No available agent"). `ray start` has
    --dashboard-agent-listen-port; ray.init has no such argument, hence this test-only shim."""
    import ray._private.parameter as parameter

    base = parameter.RayParams
    if getattr(base, "_matih_agent_port", None):
        return

    class _RayParams(base):
        _matih_agent_port = port

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("dashboard_agent_listen_port", port)
            super().__init__(*args, **kwargs)

    parameter.RayParams = _RayParams


def _wait_ready(url: str, timeout: float = 120) -> None:
    """Until /ready says every dependency is up. Right after deploy, the Gateway's first MLflow
    call (imports, the client's first request) can outlast /ready's probe limit on a busy
    2-core machine, and /ready then reports MLflow down for a moment."""
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        try:
            body = httpx.get(f"{url}/ready", timeout=30).json()
            if body.get("status") == "ok":
                return
        except httpx.HTTPError as exc:
            body = {"error": repr(exc)}
        time.sleep(1)
    raise RuntimeError(f"the platform did not become ready in {timeout}s: {body}")


def _drop_online_features(project: str) -> None:
    """The session's online features out of the machine's Redis (Feast's keys end with the project)."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        for key in client.scan_iter(match=f"*{project}", count=1000):
            client.delete(key)
    finally:
        client.close()


@pytest.fixture(scope="session")
def platform(tmp_path_factory) -> Platform:
    import ray
    from ray import serve

    from app.serving.ingress import apply_cluster_env
    from app.settings import load_settings
    from deployments.app import build

    home = tmp_path_factory.mktemp("matih_home")
    os.environ["MATIH_HOME"] = str(home)  # the CLI tests read the token file from here
    mlflow_server = MlflowServer(home)  # as in production: MLflow over HTTP, not in-process
    mlflow_server.start()
    from tests.s3server import start_s3_server

    s3 = start_s3_server()  # real S3 over HTTP (moto server mode) for s3:// batch inputs and outputs
    from tests.kafka import TansuBroker

    kafka = TansuBroker(home)  # events go to a real Kafka-protocol broker (test_events stops and restarts it)
    kafka.start()
    overrides = {"matih_home": str(home), "mlflow_tracking_uri": mlflow_server.uri, **s3.settings(),
                 # test_v2_protocol serves a triton endpoint from the platform's own V2 routes
                 "runtimes": {"triton": {"allowed_hosts": ["127.0.0.1"]}},
                 # job specs read and write under MATIH_HOME/data (the default data root) and in this bucket
                 "storage": {"allowed_buckets": ["matih-batch"]},
                 "kafka_bootstrap_servers": kafka.bootstrap,
                 # online features on the machine's Redis, under a Feast project of this session's own
                 # (every online-store key carries it), the registry a SQLite file in MATIH_HOME
                 "redis_url": REDIS_URL,
                 "features": {"online_store": "redis", "project": f"it_{uuid.uuid4().hex[:10]}"},
                 "events": {"sink": "kafka", "publish_timeout_s": 3.0, "retry_max_s": 2.0},
                 # test_drift_monitor: the loop at a test's cadence, alert webhooks to a local server
                 "monitoring": {"tick_s": 1.0, "webhook_allowed_hosts": ["127.0.0.1"], "webhook_backoff_s": 0.2}}
    port = free_port()
    # Jobs run as Ray Jobs, which need the dashboard's job API. The Ray Jobs' entry points run
    # `python` from the cluster's PATH: this environment's interpreter, as on a cluster node
    # with the platform installed.
    os.environ["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")])
    dashboard_port = free_port()
    _own_dashboard_agent_port(free_port())
    # The ingress mode of the profile (HAProxy by default), its side ports free ones so that a
    # `make run` beside the tests does not collide; MATIH_TEST_INGRESS=proxy runs the suite on
    # the classic Serve proxy instead.
    ingress = {"mode": os.environ.get("MATIH_TEST_INGRESS", "haproxy"), "stats_port": free_port(),
               "metrics_port": free_port(), "fallback_http_port": free_port(), "fallback_grpc_port": free_port()}
    overrides["http"] = {**load_settings("local", **overrides).http.model_dump(mode="json"), "ingress": ingress}
    apply_cluster_env(load_settings("local", **overrides))
    metrics_port = free_port()
    ray.init(include_dashboard=True, dashboard_port=dashboard_port, num_cpus=2, log_to_driver=False,
             _metrics_export_port=metrics_port)
    base = load_settings("local", **overrides)
    # A short queue in front of the ModelServer (more than the 32 clients of the replica-kill test
    # wait in it while no replica is up), so that test_serving_chaos can overload it with
    # a few hundred requests (no other test sends more than max_ongoing_requests at once). A
    # section given here replaces the profile's, so it is the profile's with that one key changed.
    overrides["serving"] = {**base.serving.model_dump(mode="json"), "model_server_max_queued_requests": 48}
    # Jobs that fit run side by side (test_ensembles trains three small members at once, each
    # asking for a quarter CPU): most of a small job's time is its process starting, not CPU.
    overrides["jobs"] = {**base.jobs.model_dump(mode="json"), "max_concurrent": 3}
    # Serve's end-to-end request limit, as serve_config.yaml sets it (the Gateway answers 504 just before)
    timeout_s = base.http.request_timeout_s
    from app.api.v2_grpc import SERVICER_FUNCTION

    grpc_port = free_port()
    serve.start(
        http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": timeout_s},
        grpc_options={"port": grpc_port, "grpc_servicer_functions": [SERVICER_FUNCTION],
                      "request_timeout_s": timeout_s},
    )
    serve.run(build({"settings": overrides}), name="matih", route_prefix="/")
    _wait_ready(f"http://127.0.0.1:{port}")
    token = (home / "admin_token").read_text().strip()
    p = Platform(f"http://127.0.0.1:{port}", home, token, load_settings("local", **overrides), mlflow_server, s3,
                 dashboard=f"http://127.0.0.1:{dashboard_port}", grpc=f"127.0.0.1:{grpc_port}", kafka=kafka,
                 metrics=f"127.0.0.1:{metrics_port}")
    yield p
    serve.shutdown()
    ray.shutdown()
    _drop_online_features(p.settings.features.project)
    mlflow_server.stop()
    s3.stop()
    kafka.stop()


@pytest.fixture(scope="session")
def kafka(platform):
    """The session's Kafka-protocol broker (tests.kafka.TansuBroker): events.sink is kafka."""
    return platform.kafka


@pytest.fixture(scope="session")
def iris(platform) -> dict:
    """The first slice, done once: train iris, register version 1 as champion, endpoint 'iris'."""
    with platform.client() as c:
        r = c.post("/v1/training/jobs", json=IRIS_JOB)
        assert r.status_code == 202, r.text
        job = platform.wait_job(r.json()["job_id"])
        assert job["status"] == "succeeded", (job["error"], job.get("logs"))
        r = c.post("/v1/endpoints", json={"name": "iris", "target": "iris@champion"})
        assert r.status_code == 201, r.text
    return job


IRIS_MS = "iris-ms"


@pytest.fixture(scope="session")
def iris_ms(platform, iris) -> str:
    """Endpoint 'iris-ms': the iris champion served by the ModelServer deployment
    (config.placement model_server) rather than in the Gateway's process, for the tests of
    what happens between the Gateway and ModelServer replicas."""
    with platform.client() as c:
        r = c.post("/v1/endpoints", json={"name": IRIS_MS, "target": "iris@champion",
                                          "config": {"placement": "model_server"}})
        assert r.status_code == 201, r.text
    return IRIS_MS
