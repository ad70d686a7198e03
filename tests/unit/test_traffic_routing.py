"""Traffic plans on the one predict path (app.serving.routing) through the HTTP API without
Ray: a variant per request (sticky or drawn), named in the answer and the log; shadows off the
request path, logged under the shadow log with the primary's request id; bandit re-weighing
from the rewards in the store."""

from __future__ import annotations

import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.support import free_port, in_process_context

from app.api.app import create_app
from app.bootstrap import prepare
from app.predlog.layout import shadow_log
from app.settings import load_settings
from app.traffic.bandits import BanditStore

ROW = [5.1, 3.5, 1.4, 0.2]


class Collect:
    def __init__(self):
        self.records = []

    def add(self, record) -> bool:
        self.records.append(record)
        return True


def _onnx_iris(c: float) -> bytes:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from app.onnx.sklearn_export import to_onnx

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    return to_onnx(LogisticRegression(C=c, max_iter=500).fit(X, y), X, True).SerializeToString()


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    settings = load_settings(
        "local", matih_home=str(home), serving={"bandit_refresh_s": 0.05, "shadow_max_in_flight": 4},
        runtimes={"triton": {"allowed_hosts": ["127.0.0.1"]}},
    )
    prepared = prepare(settings)
    ctx = in_process_context(settings, prepared.admin_token, jobs=None)
    sink = Collect()
    ctx.router.buffer = sink
    # One event loop for the module (the client as a context manager): shadows and bandit
    # refreshes run as tasks after the request that started them has been answered.
    with TestClient(create_app(ctx)) as client:
        client.headers["Authorization"] = f"Bearer {prepared.admin_token}"
        for c in (1.0, 0.01):
            r = client.post("/v1/models/petals/versions", data={"format": "onnx"},
                            files={"file": ("model.onnx", _onnx_iris(c), "application/octet-stream")})
            assert r.status_code == 201, r.text
        assert client.post("/v1/endpoints", json={"name": "petals", "target": "petals/1"}).status_code == 201
        yield client, sink, ctx


def _plan(client, traffic: dict | None) -> None:
    if traffic is None:
        r = client.delete("/v1/endpoints/petals/traffic")
        assert r.status_code == 204, r.text
    else:
        r = client.put("/v1/endpoints/petals/traffic", json=traffic)
        assert r.status_code == 200, r.text


def _predict(client, headers=None, **extra):
    return client.post("/v1/endpoints/petals/predict", json={"instances": [ROW], **extra}, headers=headers or {})


def test_variants_are_named_in_the_answer_and_the_log(api):
    client, sink, _ = api
    _plan(client, {"variants": [{"name": "a", "target": "petals/1", "weight": 50},
                                {"name": "b", "target": "petals/2", "weight": 50}]})
    sink.records.clear()
    seen = {}
    for _ in range(40):
        r = _predict(client)
        assert r.status_code == 200, r.text
        body = r.json()
        assert r.headers["x-matih-variant"] == body["variant"]
        seen[body["variant"]] = body["model_version"]
    assert seen == {"a": "1", "b": "2"}  # 40 draws at 50/50: both served, each by its own version
    assert {(rec.variant, rec.model_version) for rec in sink.records} == {("a", "1"), ("b", "2")}
    _plan(client, None)
    r = _predict(client)
    assert r.json()["variant"] is None and "x-matih-variant" not in r.headers


def test_a_sticky_key_keeps_its_variant_from_the_body_or_the_header(api):
    client, sink, _ = api
    _plan(client, {"variants": [{"name": "a", "target": "petals/1", "weight": 50},
                                {"name": "b", "target": "petals/2", "weight": 50}],
                   "sticky": {"key": "customer_id"}})
    sink.records.clear()
    by_key = {}
    for i in range(30):
        key = f"c{i}"
        first = _predict(client, customer_id=key).json()["variant"]
        assert all(_predict(client, customer_id=key).json()["variant"] == first for _ in range(3))
        assert _predict(client, headers={"X-Matih-Sticky": key}).json()["variant"] == first
        by_key[key] = first
    assert set(by_key.values()) == {"a", "b"}
    # the sticky field is the router's, not the model's: the log keeps the model's input only
    assert all(rec.inputs == {"instances": [ROW]} for rec in sink.records)
    r = _predict(client, customer=1)
    assert r.status_code == 422 and r.json()["details"]["field"] == "customer" and "customer_id" in r.json()["error"]
    assert _predict(client, customer_id={"nested": 1}).status_code == 422
    _plan(client, None)
    assert _predict(client, customer_id="c1").status_code == 422  # no plan, no sticky key


def test_a_leg_with_a_runtime_of_its_own_is_checked_with_its_own_config(api):
    client, _, _ = api
    bad = {"variants": [{"name": "a", "target": "petals/1", "weight": 1}],
           "shadows": [{"target": "petals/1", "runtime": "triton", "config": {"url": "10.9.9.9:8000"}}]}
    r = client.put("/v1/endpoints/petals/traffic", json=bad)
    assert r.status_code == 422 and r.json()["details"]["field"].startswith("shadows[0].config"), r.text
    assert client.get("/v1/endpoints/petals/traffic").status_code == 404  # nothing stored


def _wait(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = fn()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError("timed out")


def test_shadows_are_logged_under_the_shadow_log_and_their_failures_stay_theirs(api):
    client, sink, _ = api
    closed = free_port()  # nothing listens: the triton shadow's calls are refused
    _plan(client, {"variants": [{"name": "a", "target": "petals/1", "weight": 1}],
                   "shadows": [{"target": "petals/2", "sample": 1.0},
                               {"target": "petals/1", "name": "broken", "runtime": "triton",
                                "config": {"url": f"127.0.0.1:{closed}", "model_name": "x", "timeout_s": 1}}]})
    sink.records.clear()
    r = _predict(client)
    assert r.status_code == 200 and r.json()["variant"] == "a"
    rid = r.json()["request_id"]
    shadows = _wait(lambda: [x for x in sink.records if x.endpoint == shadow_log("petals")][:2]
                    if len([x for x in sink.records if x.endpoint == shadow_log("petals")]) >= 2 else None)
    by_label = {x.variant: x for x in shadows}
    assert set(by_label) == {"petals/2", "broken"}
    assert all(x.request_id == rid for x in shadows)
    assert by_label["petals/2"].status == 200 and by_label["petals/2"].model_version == "2"
    assert by_label["petals/2"].inputs is None  # the primary's record holds the inputs
    assert by_label["broken"].status >= 500 and by_label["broken"].outputs is None
    (primary,) = [x for x in sink.records if x.endpoint == "petals"]
    assert primary.status == 200 and primary.variant == "a"
    _plan(client, None)


def test_a_bandit_plan_moves_traffic_to_the_rewarded_arm(api):
    client, sink, ctx = api
    _plan(client, {"variants": [{"name": "a", "target": "petals/1", "weight": 50},
                                {"name": "b", "target": "petals/2", "weight": 50}],
                   "strategy": "thompson", "bandit": {"floor": 0.05}})
    bandits = BanditStore(ctx.store)
    with bandits._tx() as session:
        for _ in range(200):
            bandits.apply(session, "petals", "a", None, 0.0)
            bandits.apply(session, "petals", "b", None, 1.0)
    _predict(client)  # the first request starts a refresh
    version = client.get("/v1/endpoints/petals").json()["spec_version"]
    weights = _wait(lambda: ctx.router.bandit_state("petals", version))
    assert weights["b"] > 0.9 and weights["a"] >= 0.05 - 1e-9
    counts = {"a": 0, "b": 0}
    for _ in range(60):
        counts[_predict(client).json()["variant"]] += 1
    assert counts["b"] > counts["a"]
    bandits.reset("petals")
    _plan(client, None)


def test_a_slow_shadow_never_holds_the_answer(api):
    """A shadow that takes 1 s per call: the primary's answers keep their pace; calls beyond
    serving.shadow_max_in_flight (4 here) are dropped, not queued."""
    from tests.v2server import V2Server

    client, sink, ctx = api
    server = V2Server(delay_s=1.0)
    try:
        _plan(client, {"variants": [{"name": "a", "target": "petals/1", "weight": 1}],
                       "shadows": [{"target": "petals/1", "name": "slow", "runtime": "triton", "config": server.config}]})
        _predict(client)
        sink.records.clear()
        started = time.perf_counter()
        for _ in range(20):
            assert _predict(client).status_code == 200
        assert time.perf_counter() - started < 1.0  # 20 answers before the first shadow call ends
        assert server.calls <= 5  # at most 4 in flight (+ the warm-up's)
        done = _wait(lambda: [x for x in sink.records if x.endpoint == shadow_log("petals")], timeout=15)
        assert all(x.variant == "slow" and x.latency_ms >= 900 for x in done)
    finally:
        _plan(client, None)
        server.close()


def test_a_triton_endpoint_calls_the_remote_models_own_name(api):
    """config.model_name (the model on the V2 server) differs from the registered name: the
    loader's metrics label must not replace it (a triton endpoint answered 404 once)."""
    from tests.v2server import V2Server

    client, _, _ = api
    server = V2Server()
    try:
        r = client.post("/v1/endpoints", json={"name": "petals-v2", "target": "petals/1", "runtime": "triton",
                                               "config": server.config})
        assert r.status_code == 201, r.text
        for _ in range(2):
            r = client.post("/v1/endpoints/petals-v2/predict", json={"instances": [ROW]})
            assert r.status_code == 200 and r.json()["predictions"] == [0], r.text
        assert server.calls >= 2  # (the load's warm-up calls it too)
    finally:
        client.delete("/v1/endpoints/petals-v2")
        server.close()


def test_refused_or_sampled_out_requests_leave_no_shadow_record(api):
    """A 4xx is the caller's: no shadow copy. A request the log samples out has its shadows'
    answers left out too, so the shadow log pairs with the primary's."""
    client, sink, _ = api
    _plan(client, {"variants": [{"name": "a", "target": "petals/1", "weight": 1}],
                   "shadows": [{"target": "petals/2"}]})
    sink.records.clear()
    assert client.post("/v1/endpoints/petals/predict", json={"instances": [[1.0, 2.0]]}).status_code == 422
    spec = client.get("/v1/endpoints/petals").json()["spec"]
    assert client.put("/v1/endpoints/petals", json={"spec": {**spec, "logging": {"sample_rate": 0.0}}}).status_code == 200
    for _ in range(5):
        assert _predict(client).status_code == 200
    time.sleep(0.5)  # time for the shadows' tasks
    assert sink.records == []
    assert client.put("/v1/endpoints/petals", json={"spec": {**spec, "logging": {"sample_rate": 1.0}}}).status_code == 200
    _predict(client)
    _wait(lambda: [x for x in sink.records if x.endpoint == shadow_log("petals")])
    _plan(client, None)
