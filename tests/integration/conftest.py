"""One Ray cluster and one Serve application for the whole integration session, over HTTP."""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

IRIS_JOB = {
    "name": "iris-logreg",
    "framework": "sklearn",
    "estimator": "sklearn.linear_model.LogisticRegression",
    "hyperparameters": {"max_iter": 300},
    "dataset": {"uri": "builtin://iris", "target": "target"},
    "register_as": "iris",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Platform:
    url: str
    home: Path
    admin_token: str
    settings: object

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


@pytest.fixture(scope="session")
def platform(tmp_path_factory) -> Platform:
    import ray
    from ray import serve

    from app.settings import load_settings
    from deployments.app import build

    home = tmp_path_factory.mktemp("matih_home")
    os.environ["MATIH_HOME"] = str(home)  # the CLI tests read the token file from here
    port = _free_port()
    ray.init(include_dashboard=False, num_cpus=2, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build({"settings": {"matih_home": str(home)}}), name="matih", route_prefix="/")
    token = (home / "admin_token").read_text().strip()
    p = Platform(f"http://127.0.0.1:{port}", home, token, load_settings("local", matih_home=str(home)))
    yield p
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def iris(platform) -> dict:
    """The first slice, done once: train iris, register version 1 as champion, endpoint 'iris'."""
    with platform.client() as c:
        r = c.post("/v1/training/jobs", json=IRIS_JOB)
        assert r.status_code == 202, r.text
        job = platform.wait_job(r.json()["job_id"])
        assert job["status"] == "succeeded", job.get("logs")
        r = c.post("/v1/endpoints", json={"name": "iris", "target": "iris@champion"})
        assert r.status_code == 201, r.text
    return job
