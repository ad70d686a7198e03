"""The platform's metrics as a real Prometheus sees them: scraped from Ray's metrics endpoint of
the test cluster with the scrape config of docs/operations.md (``ray_matih_*`` stored as
``matih_*``), then queried through Prometheus' HTTP API by endpoint and model version.

Needs the ``prometheus`` binary (Debian's package; ``.ci/run`` installs it): skipped without it,
except in CI (``CI`` or ``MATIH_REQUIRE_PROMETHEUS`` set, as ``.ci/run`` does), where a missing
Prometheus fails the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import yaml

from app.metrics import RELABEL_RULE
from tests.support import free_port, wait_until

SETOSA = [5.1, 3.5, 1.4, 0.2]
# Ray exports every metrics_report_interval_ms (10 s in the test cluster) and Prometheus scrapes
# every second: a value recorded now is queryable within about two report intervals.
WAIT_S = 90


@pytest.fixture(scope="module")
def prometheus(platform, tmp_path_factory) -> str:
    """A Prometheus scraping the cluster's metrics endpoint every second; its base URL."""
    binary = shutil.which("prometheus")
    if binary is None:
        if os.environ.get("CI") or os.environ.get("MATIH_REQUIRE_PROMETHEUS"):
            pytest.fail("prometheus is not installed; CI must run the metrics test (.ci/run installs it)")
        pytest.skip("prometheus is not installed (apt-get install prometheus)")
    home = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{
            "job_name": "ray",
            "static_configs": [{"targets": [platform.metrics]}],
            "metric_relabel_configs": [RELABEL_RULE],
        }],
    }
    (home / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = open(home / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [binary, f"--config.file={home / 'prometheus.yml'}", f"--storage.tsdb.path={home / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited: {(home / 'prometheus.log').read_text()[-2000:]}")
            try:
                return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(ready, timeout=60)
        wait_until(lambda: _query(url, 'up{job="ray"} == 1'), timeout=60)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _query(url: str, promql: str) -> list[dict]:
    """The instant vector of ``promql``: [{"metric": {labels}, "value": [t, "v"]}, ...]."""
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def _eventually(url: str, promql: str) -> list[dict]:
    return wait_until(lambda: _query(url, promql), timeout=WAIT_S, every=1)


def _at_least(url: str, promql: str, total: float) -> list[dict]:
    """The series of ``promql`` once their values add up to ``total`` (a counter still being exported)."""
    return wait_until(lambda: (r := _query(url, promql)) and sum(float(s["value"][1]) for s in r) >= total and r,
                      timeout=WAIT_S, every=1)


@pytest.fixture(scope="module")
def champion(platform, iris) -> str:
    with platform.client() as c:
        return c.get("/v1/endpoints/iris").json()["model_version"]


@pytest.fixture(scope="module")
def traffic(platform, iris, iris_ms, champion) -> None:
    """Predictions on the Gateway-served endpoint and bursts of concurrent ones on the
    ModelServer-served endpoint (so that its replicas batch), and one refused request."""
    with platform.client() as c:
        for _ in range(10):
            assert c.post("/v1/endpoints/iris/predict", json={"instances": [SETOSA]}).status_code == 200
        assert c.post("/v1/endpoints/iris/predict", json={"instances": [[1.0]]}).status_code == 422

        def one(_):
            return c.post(f"/v1/endpoints/{iris_ms}/predict", json={"instances": [SETOSA, SETOSA]}).status_code

        with ThreadPoolExecutor(16) as pool:
            for _ in range(3):
                assert set(pool.map(one, range(48))) == {200}


def test_ray_metrics_endpoint_serves_matih_and_serve_series_side_by_side(platform, prometheus, traffic):
    # the Gateway loaded the champion in its own process, the ModelServer in a replica
    loads = _eventually(prometheus, 'matih_model_load_seconds_count{model="iris"}')
    assert "onnx" in {s["metric"]["runtime"] for s in loads}  # earlier tests of the session add triton, native
    assert all(s["metric"]["model_version"] for s in loads)
    wait_until(lambda: {s["metric"]["where"] for s in _query(prometheus, "sum by (where) (matih_models_loaded) > 0")}
               >= {"gateway", "model_server"}, timeout=WAIT_S, every=1)
    # Ray Serve's own series, from the same scrape
    assert _eventually(prometheus, "ray_serve_num_http_requests_total")
    # no ray_matih_* series is stored: the relabel rule renamed every one
    assert not _query(prometheus, '{__name__=~"ray_matih_.*"}')


def test_batches_by_model(platform, prometheus, traffic):
    batches = _eventually(prometheus, 'sum by (model) (matih_batch_requests_count{model="iris"}) > 0')
    assert batches[0]["metric"]["model"] == "iris"
    rows = _eventually(prometheus, 'sum by (model) (matih_batch_rows_sum{model="iris"})')
    requests = _eventually(prometheus, 'sum by (model) (matih_batch_requests_sum{model="iris"})')
    # each request of the bursts holds two rows
    assert float(rows[0]["value"][1]) >= float(requests[0]["value"][1]) >= 2


def test_jobs_by_state_and_duration(platform, prometheus, iris):
    durations = _eventually(prometheus, 'matih_job_duration_seconds_count{state="succeeded"}')
    kind = durations[0]["metric"]["kind"]
    assert kind
    assert _eventually(prometheus, f'matih_job_duration_seconds_sum{{kind="{kind}", state="succeeded"}} > 0')
    # the scheduler counts the store's jobs every jobs.reconcile_interval_s
    assert _eventually(prometheus, f'max by (kind, state) (matih_jobs{{kind="{kind}", state="succeeded"}}) >= 1')


def test_requests_by_endpoint_and_version(platform, prometheus, traffic, champion):
    """Recorded by the EndpointRouter (app/serving/routing.py), one place for every predict path."""
    # Ray exports every few seconds: a first scrape may hold part of the traffic, so wait for all of it
    ok = _at_least(prometheus, f'matih_requests_total{{endpoint="iris", model_version="{champion}", code="200"}}', 10)
    assert "rest" in {s["metric"]["protocol"] for s in ok} and ok[0]["metric"]["model"] == "iris"
    assert _eventually(prometheus, 'matih_requests_total{endpoint="iris", code="422"}')
    p99 = _eventually(
        prometheus,
        f'histogram_quantile(0.99, sum by (le, endpoint, model_version) '
        f'(matih_request_duration_seconds_bucket{{endpoint="iris", model_version="{champion}"}}))',
    )
    assert 0 < float(p99[0]["value"][1]) < 60
    _at_least(prometheus, 'sum(matih_request_duration_seconds_count{endpoint="iris-ms"})', 3 * 48)
