"""Traffic plans on the real cluster: a plan put through the API is live in the Gateway at once
(pushed through the change feed), every answer names its variant, sticky keys keep theirs;
shadows that sleep 2 s or always fail leave the primary's answers alone and are compared with
it in the shadow report, once the prediction log has written both; a bandit moves traffic to
the arm that /feedback rewards."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest

from tests.support import wait_until
from tests.v2server import V2Server

pytestmark = pytest.mark.integration

ROW = [5.1, 3.5, 1.4, 0.2]


def _onnx_iris(c: float) -> bytes:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression

    from app.onnx.sklearn_export import to_onnx

    X, y = load_iris(return_X_y=True)
    X = X.astype(np.float32)
    return to_onnx(LogisticRegression(C=c, max_iter=500).fit(X, y), X, True).SerializeToString()


@pytest.fixture(scope="module")
def flowers(platform) -> dict:
    """Two versions of model 'traffic-iris' and an endpoint on the first."""
    with platform.client() as c:
        versions = []
        for c_ in (1.0, 0.05):
            r = c.post("/v1/models/traffic-iris/versions", data={"format": "onnx"},
                       files={"file": ("model.onnx", _onnx_iris(c_), "application/octet-stream")})
            assert r.status_code == 201, r.text
            versions.append(r.json()["version"])
        r = c.post("/v1/endpoints", json={"name": "tr", "target": f"traffic-iris/{versions[0]}"})
        assert r.status_code == 201, r.text
    return {"a": f"traffic-iris/{versions[0]}", "b": f"traffic-iris/{versions[1]}"}


def _predict(c, name="tr", **extra):
    r = c.post(f"/v1/endpoints/{name}/predict", json={"instances": [ROW], **extra})
    assert r.status_code == 200, r.text
    return r


def test_a_plan_is_live_at_once_and_every_answer_names_its_variant(platform, flowers):
    with platform.client() as c:
        _predict(c)  # the endpoint's row is cached in the Gateway now
        plan = {"variants": [{"name": "a", "target": flowers["a"], "weight": 50},
                             {"name": "b", "target": flowers["b"], "weight": 50}],
                "sticky": {"key": "customer_id"}}
        r = c.put("/v1/endpoints/tr/traffic", json=plan)
        assert r.status_code == 200, r.text
        put_at = time.monotonic()
        # pushed, not waited out: the cached row (trusted for serving.resolve_ttl_s) goes at once
        wait_until(lambda: _predict(c).json()["variant"] is not None, timeout=1.0, every=0.05)
        assert time.monotonic() - put_at < 1.0
        seen = {}
        for i in range(40):
            r = _predict(c, customer_id=f"k{i}")
            body = r.json()
            assert r.headers["x-matih-variant"] == body["variant"]
            assert body["model_version"] == flowers[body["variant"]].split("/")[1]
            seen[f"k{i}"] = body["variant"]
        assert set(seen.values()) == {"a", "b"}
        for key, variant in list(seen.items())[:10]:  # sticky: the same key, the same variant
            assert _predict(c, customer_id=key).json()["variant"] == variant
            r = c.post("/v2/models/tr/infer", headers={"X-Matih-Sticky": key},
                       json={"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": ROW}]})
            assert r.status_code == 200 and r.json()["parameters"]["variant"] == variant, r.text
        got = c.get("/v1/endpoints/tr/traffic").json()
        assert [v["name"] for v in got["traffic"]["variants"]] == ["a", "b"], got
        assert c.delete("/v1/endpoints/tr/traffic").status_code in (200, 204)
        wait_until(lambda: _predict(c).json()["variant"] is None, timeout=1.0, every=0.05)
        bad = c.put("/v1/endpoints/tr/traffic", json={"variants": [{"name": "a", "target": "no-such-model/1",
                                                                    "weight": 1}]})
        assert bad.status_code in (404, 422), bad.text
        assert _predict(c).json()["variant"] is None  # the refused plan changed nothing


def test_shadows_that_sleep_or_fail_leave_the_primary_alone(platform, flowers):
    slow, failing = V2Server(delay_s=2.0), V2Server(fail_rate=1.0)
    try:
        with platform.client() as c:
            def p50(n=30) -> float:
                times = []
                for _ in range(n):
                    t0 = time.perf_counter()
                    _predict(c)
                    times.append(time.perf_counter() - t0)
                return statistics.median(times)

            plain = p50()
            plan = {"variants": [{"name": "a", "target": flowers["a"], "weight": 1}],
                    "shadows": [{"target": flowers["a"], "name": "slow", "runtime": "triton", "config": slow.config},
                                {"target": flowers["a"], "name": "failing", "runtime": "triton",
                                 "config": failing.config},
                                {"target": flowers["b"], "name": "b"}]}
            assert c.put("/v1/endpoints/tr/traffic", json=plan).status_code == 200
            wait_until(lambda: _predict(c).json()["variant"] == "a", timeout=1.0, every=0.05)
            shadowed = p50()
            # a shadow that took its 2 s on the request path would show in every answer
            assert shadowed < plain + 0.05, (plain, shadowed)

            def report():
                # one request per poll, slower than the slow shadow's pace: each replica runs at
                # most serving.shadow_max_in_flight (8) shadow calls and drops the copies beyond
                _predict(c)
                r = c.get("/v1/endpoints/tr/shadow/report")
                assert r.status_code == 200, r.text
                doc = r.json()
                shadows = doc["shadows"]
                done = all(shadows.get(k, {}).get("n_compared", 0) >= 3 for k in ("slow", "failing", "b"))
                last[0] = doc
                return doc if done else None

            last = [None]
            try:
                doc = wait_until(report, timeout=90, every=0.5)
            except AssertionError:
                from datetime import datetime, timedelta, timezone

                from app.predlog.join import read_window
                from app.predlog.layout import shadow_log

                now = datetime.now(timezone.utc)
                rows = read_window(platform.settings, shadow_log("tr"), now - timedelta(hours=1), now).select(
                    ["variant", "model", "model_version", "status", "latency_ms"]).to_pylist()
                raise AssertionError(f"the shadow report never compared 3 of each: {last[0]}; rows {rows[-20:]}; "
                                     f"calls slow {slow.calls} failing {failing.calls}") from None
            assert failing.calls >= 3 and slow.calls >= 3
            sh = doc["shadows"]
            assert sh["failing"]["error_rate"]["shadow"] == 1.0 and sh["failing"]["error_rate"]["primary"] == 0.0
            assert sh["slow"]["latency_ms"]["shadow"]["p50"] >= 1900
            assert sh["slow"]["error_rate"]["shadow"] == 0.0
            assert 0.0 <= sh["b"]["agreement"] <= 1.0 and sh["b"]["error_rate"]["shadow"] == 0.0
            assert c.delete("/v1/endpoints/tr/traffic").status_code in (200, 204)
    finally:
        slow.close()
        failing.close()


def test_a_bandit_moves_traffic_to_the_rewarded_arm(platform, flowers):
    """Thompson sampling on binary rewards from /feedback: arm b is rewarded 60% of the time,
    arm a 10%; after a few hundred rewarded requests b serves most of the traffic and a keeps
    its floor."""
    rng = np.random.default_rng(0)
    with platform.client() as c:
        assert c.post("/v1/endpoints", json={"name": "tr-bandit", "target": flowers["a"]}).status_code == 201
        plan = {"variants": [{"name": "a", "target": flowers["a"], "weight": 50},
                             {"name": "b", "target": flowers["b"], "weight": 50}],
                "strategy": "thompson", "bandit": {"reward": "binary", "floor": 0.05}}
        assert c.put("/v1/endpoints/tr-bandit/traffic", json=plan).status_code == 200
        for _ in range(4):  # rounds: serve and reward (a reward ahead of its log record counts once it is there)
            served = [_predict(c, "tr-bandit").json() for _ in range(60)]
            rows = [{"request_id": s["request_id"],
                     "reward": float(rng.random() < (0.6 if s["variant"] == "b" else 0.1))} for s in served]

            r = c.post("/v1/endpoints/tr-bandit/feedback", json=rows)
            assert r.status_code == 200 and r.json()["accepted"] == len(rows), r.text

        def counted():  # rewards sent ahead of their log record count once the log has it, at the
            _predict(c, "tr-bandit")  # Gateway's next re-weighing (which a request starts)
            g = c.get("/v1/endpoints/tr-bandit/traffic").json()
            return g if sum((a or {}).get("n", 0) for a in (g.get("arms") or {}).values()) >= 200 else None

        arms = wait_until(counted, timeout=30, every=0.5)
        time.sleep(2 * platform.settings.serving.bandit_refresh_s)  # the Gateway re-weighs from them
        counts = {"a": 0, "b": 0}
        for _ in range(300):  # the floor's 5% of 300: a never drawn has chance 0.95**300 (2e-7); of 100, 0.6%
            counts[_predict(c, "tr-bandit").json()["variant"]] += 1
        assert counts["b"] > 210 and counts["a"] >= 1, (counts, arms)


def test_the_test_v2_server_serves_as_a_triton_endpoint(platform, flowers):
    """tests/v2server.py behind the triton runtime on the cluster's ModelServer (the slow and
    failing shadows above are this server)."""
    server = V2Server()
    try:
        with platform.client() as c:
            r = c.post("/v1/endpoints", json={"name": "tr-v2", "target": flowers["a"], "runtime": "triton",
                                              "config": server.config})
            assert r.status_code == 201, r.text
            r = c.post("/v1/endpoints/tr-v2/predict", json={"instances": [ROW]})
            assert r.status_code == 200 and r.json()["predictions"] == [0], r.text
            assert server.calls >= 1  # (its load's warm-up calls it too)
    finally:
        server.close()
